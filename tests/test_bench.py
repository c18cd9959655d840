"""scripts/bench_ppo.py at a microscopic config: the JSON contract and the naive references' agreement."""
import json

from scripts import bench_ppo

MICRO = ["--hidden_size", "32", "--num_hidden_layers", "1", "--batch_size", "2", "--mini_batch_size", "1",
         "--max_gen_len", "4", "--prompt_len", "40", "--steps", "3", "--device", "cpu"]


def json_lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_bench_prints_one_json_line_with_full_length_responses(capsys, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # read, not applied: glibc reads it at start-up
    bench_ppo.main(MICRO)
    (result,) = json_lines(capsys)  # train_ppo's log went to stderr
    assert result["config"]["allocator"].endswith(" MALLOC_MMAP_THRESHOLD_=131072")  # where RSS figures came from
    assert result["config"]["hidden_size"] == 32 and result["config"]["steps"] == 3
    assert result["avg_response_len"] == 4  # EOS pinned: every response runs to max_gen_len
    assert result["s_per_step"]["min"] <= result["s_per_step"]["median"] <= result["s_per_step"]["max"]
    assert set(result["phase_s"]) == {"rollout", "forwards", "reward", "update"}
    assert result["rollout_tokens_per_s"] > result["end_to_end_tokens_per_s"] > 0
    assert result["peak_rss_mb"] > 0 and "cuda_peak_alloc_mb" not in result


def test_ablations_match_their_naive_references(capsys):
    bench_ppo.main(MICRO + ["--ablations"])
    lines = json_lines(capsys)
    assert [l["ablation"] for l in lines] == ["generation", "generation", "rollout_logprobs", "gae", "reward_scoring",
                                              "token_sampling", "logprob_backward", "optimizer_step"]
    assert all(l["ours_s"] > 0 and l["naive_s"] > 0 for l in lines)
    assert all(l["max_abs_diff"] < 1e-4 for l in lines if "max_abs_diff" in l)


def test_flops_count_the_step_and_grow_with_the_model(capsys):
    bench_ppo.main(MICRO + ["--flops"])
    bench_ppo.main([*MICRO, "--hidden_size", "64", "--flops"])
    small, wide = json_lines(capsys)
    assert small["config"]["steps"] == 2  # the count runs 2 identical steps and halves the total
    assert small["matmul_gflop_per_step"] > 0 and small["gemm_gflops"] > 0
    assert small["matmul_floor_s_per_step"] == small["matmul_gflop_per_step"] / small["gemm_gflops"]
    # twice the width: the layers' matmuls 4x, the vocabulary head 2x, so between 2x and 4x overall
    assert 2 < wide["matmul_gflop_per_step"] / small["matmul_gflop_per_step"] < 4


def test_llama_preset_trains_a_transformers_policy_folder(capsys):
    bench_ppo.main(MICRO + ["--preset", "llama_mm2"])
    captured = capsys.readouterr()
    (result,) = [json.loads(line) for line in captured.out.splitlines()]
    assert "(LlamaForCausalLM, hidden 32, 1 layers)" in captured.err  # train_ppo's log names the policy
    assert result["config"]["preset"] == "llama_mm2" and result["config"]["hidden_size"] == 32
    assert result["avg_response_len"] == 4  # EOS pinned on the Llama's lm_head too
