#!/usr/bin/env bash
# The CUDA checks and benchmarks, as one script for a lent GPU (run from the repository root; results go
# under $OUT, default gpu_out/): the CUDA paths the CPU suite cannot run, and the numbers the README quotes.
# Every check runs in its own process under a time limit, so one that fails or hangs does not stop the rest;
# the last lines summarise the JSON results. Two halves, each under the device tool's 10 minutes per command:
#   bash scripts/gpu_checks.sh checks   # correctness on CUDA (bf16, fp16, GRPO + LoRA + checkpointing, FSDP)
#   bash scripts/gpu_checks.sh bench    # speed (eager, varied lengths, compiled) and memory (0.5B shape)
set -u
part=${1:-checks}
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then  # packages the GPU image lacks, carried as wheels (datasets, ...)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi

check() {  # check NAME SECONDS COMMAND...: its log in $out/NAME.log, its last line on screen
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - start)) s | $(tail -n 1 "$out/$name.log" | cut -c1-300)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft, datasets; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)" | tee -a "$out/gpu.txt"

if [ "$part" = checks ]; then
# correctness on CUDA: the demo under bf16 autocast (first ratio exactly 1, the sampler's log-probs those of the
# scoring forward at bf16 scale, the step-1 KL to a reference kept in bf16), the held-out evaluation
check demo_bf16 150 python3 train_ppo.py --device cuda --max_steps 8 --eval_interval 4 --eval_limit 64 \
    --save_dir "$out/demo_bf16"
check demo_fp16 150 python3 train_ppo.py --device cuda --dtype float16 --max_steps 4 --eval_data_path none \
    --save_dir "$out/demo_fp16"
check grpo_lora_gc 150 python3 train_ppo.py --device cuda --max_steps 4 --eval_data_path none --adv_estimator grpo \
    --n_samples_per_prompt 4 --batch_size 8 --lora_rank 8 --gradient_checkpointing 1 --save_dir "$out/grpo_lora"
# DAPO's pieces and rollout correction in bf16, where the sampler and the scoring forward differ: the mismatch
# metrics (rollout_token_ratio_max/min, rollout_kl) and the correction weights on a real GPU
check dapo_rollout_is 150 python3 train_ppo.py --device cuda --max_steps 6 --eval_data_path none --adv_estimator grpo \
    --n_samples_per_prompt 4 --batch_size 8 --policy_loss cispo --filter_groups 1 --overlong_buffer_len 16 \
    --rollout_is token --save_dir "$out/dapo"
check fsdp_1gpu 150 torchrun --standalone --nproc_per_node 1 train_ppo.py --device cuda --fsdp 1 --max_steps 3 \
    --eval_data_path none --save_dir "$out/fsdp"

check bench_small 120 python3 scripts/bench_ppo.py --preset small --device cuda --steps 6
check bench_mm2 120 python3 scripts/bench_ppo.py --preset mm2 --device cuda --steps 6
check bench_mm2_varied 120 python3 scripts/bench_ppo.py --preset mm2 --device cuda --steps 6 --lengths varied
else
# speed compiled, and memory
check bench_mm2_compile 240 python3 scripts/bench_ppo.py --preset mm2 --device cuda --steps 6 --compile 1

# memory: one PPO step of a Qwen2.5-0.5B-shaped policy, full / + checkpointing / + LoRA / both
check memory_qwen05b 300 python3 scripts/bench_ppo.py --preset qwen0.5b --device cuda --memory
fi

echo "== summary"
for f in "$out"/*.log; do
    grep -h '^{' "$f" | tail -n 1 | cut -c1-400
done
grep -h "first_minibatch_ratio_dev\|sampler_logprob_gap" "$out"/demo_bf16/metrics.jsonl 2>/dev/null | head -n 2 \
    | python3 -c "import json, sys; [print({k: json.loads(l)[k] for k in ('step', 'kl_ref', 'first_minibatch_ratio_dev',
    'sampler_logprob_gap')}) for l in sys.stdin]"
tail -n 1 "$out"/dapo/metrics.jsonl 2>/dev/null | python3 -c "import json, sys; m = json.loads(sys.stdin.read());
print({k: v for k, v in m.items() if k.startswith(('rollout_', 'filter_', 'sampler_'))})"
