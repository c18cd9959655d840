"""Build the demo kit that `python train_ppo.py` trains with no flags, offline, on a CPU.

    python scripts/build_demo.py             # full size: demo/ and two prompt files, ~15 min on 2 cores
    python scripts/build_demo.py --tiny ...  # a miniature kit in seconds (tests)

The task is single-digit addition asked in six
English and Chinese phrasings, answered as
    <think>\\n7 + 5 = 12\\n</think>\\n<answer>\\n12\\n</answer>
Every (operation, a, b, phrasing) question goes either to training or to the held-out set.
Steps:
1. a tiny MiniMind actor is pretrained on clean worked examples, then fine-tuned (SFT) on chats
   whose answers are deliberately imperfect: three phrasings usually break the format and
   three usually answer off by one (QUIRKS). Greedy decoding then starts far from perfect,
   while the right behaviour keeps real probability mass for PPO to find and reinforce.
2. a reward model (a 1-label LlamaForSequenceClassification whose backbone starts from the
   SFT actor, as in InstructGPT) learns pairwise preferences: right over wrong answers (whole
   responses and the answer-only chats that the trainer's Reward also scores) and the exact
   format over broken ones.
3. prompt files in MiniMind's rlaif format, with the ground truth in an extra "answer" field.
"""
import argparse
import json
import os
import random
import shutil
import sys
import time
from collections import namedtuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
from transformers.utils import logging as hf_logging

from dataset.lm_dataset import RLAIFDataset
from evaluation import evaluate
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from reward import Reward, RewardModel, load_reward_model
from model.loading import init_model
from trainer_utils import build_cosine_scheduler, save_weights, setup_seed

# ----------------------------------------------------------------------------- the task
OPS = {"+": (lambda a, b: a + b, "plus", "加", "加上")}
PHRASINGS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "What is {a} {en} {b}?",
             "{a} {zh} {b} 等于多少？", "计算 {a} {op} {b}。", "{a} {zh2} {b} 是多少？"]
# Phrasings the kit never trains on, for dataset/rlaif-novel.jsonl: does PPO teach the task or the six phrasings?
NOVEL_PHRASINGS = ["How much is {a} + {b}?", "Add {a} and {b}.", "Please work out {a} + {b}.",
                   "{a} + {b} = ?", "What do you get if you add {a} and {b}?", "求 {a} 与 {b} 的和。",
                   "{a} 和 {b} 相加是多少？", "请帮我算 {a} + {b}。"]
# What the SFT data does wrong, per phrasing, with probability --quirk_prob: (layout, answer offset).
# The crossing gives every mix: right, broken format, wrong answer, both.
QUIRKS = [("good", 0), ("no_think", 0), ("good", 1), ("no_newlines", -1), ("good", 1), ("extra_text", 0)]
EXTRA_TEXT = ["Hope this helps!", "Done.", "希望对你有帮助！", "答案如上。"]
# layouts that break the FORMAT regex, for the reward model's format pairs
BROKEN = ["no_think", "no_newlines", "extra_text", "truncated", "repeated", "bare"]
ANSWER_VISIBLE = [layout for layout in BROKEN if layout != "truncated"]

Question = namedtuple("Question", "op a b phrasing")


def all_questions():
    # single digits keep the fact table small (100 sums) so both the actor and the reward model can
    # learn it on a CPU in minutes; the wider 0..20 table left the reward model near chance on answers
    return [Question("+", a, b, k) for a in range(10) for b in range(10) for k in range(len(PHRASINGS))]


def question_text(q):
    _, en, zh, zh2 = OPS[q.op]
    return PHRASINGS[q.phrasing].format(a=q.a, b=q.b, op=q.op, en=en, zh=zh, zh2=zh2)


def true_value(q):
    return OPS[q.op][0](q.a, q.b)


def render(q, value, layout="good", rng=None):
    """A response stating `value` as the result, in one of the layouts (all but "good" break FORMAT)."""
    think = f"{q.a} {q.op} {q.b} = {value}"
    good = f"<think>\n{think}\n</think>\n<answer>\n{value}\n</answer>"
    if layout == "good":
        return good
    if layout == "no_think":
        return f"<answer>\n{value}\n</answer>"
    if layout == "no_newlines":
        return f"<think>{think}</think><answer>{value}</answer>"
    if layout == "extra_text":
        return f"{good}\n{rng.choice(EXTRA_TEXT)}"
    if layout == "truncated":  # cut before the closing tag is complete, as a response hitting max_gen_len
        return good[:rng.randrange(1, len(good) - 1)]
    if layout == "repeated":
        return f"{good}\n{good}"
    if layout == "bare":
        return str(value)
    raise ValueError(layout)


def wrong_value(value, rng):
    offset = rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])
    return value + offset if value + offset >= 0 else value - offset


def user(q):
    return [{"role": "user", "content": question_text(q)}]


def assistant(content):
    return [{"role": "assistant", "content": content}]


# ----------------------------------------------------------------------------- data for the actor
def sft_response(q, rng, quirk_prob):
    layout, offset = QUIRKS[q.phrasing]
    value = true_value(q)
    if rng.random() < quirk_prob:
        value = value + offset if value + offset >= 0 else value + 1
    else:
        layout = "good"
    return render(q, value, layout, rng)


def lm_batch(pieces):
    """pieces: (context ids, target ids) pairs -> right-padded ids and labels (-100 = no loss)."""
    width = max(len(c) + len(t) for c, t in pieces)
    ids = torch.zeros(len(pieces), width, dtype=torch.long)  # pad id 0
    labels = torch.full((len(pieces), width), -100, dtype=torch.long)
    for row, (context, target) in enumerate(pieces):
        ids[row, :len(context) + len(target)] = torch.tensor(context + target)
        labels[row, len(context):len(context) + len(target)] = torch.tensor(target)
    return ids, labels


def pretrain_batch(questions, tokenizer, rng, batch_size):
    """Plain text, every token trained: a question and its clean worked answer."""
    texts = [f"{question_text(q)}\n{render(q, true_value(q))}" for q in rng.sample(questions, batch_size)]
    targets = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return lm_batch([([tokenizer.bos_token_id], t + [tokenizer.eos_token_id]) for t in targets])


def sft_batch(questions, tokenizer, rng, batch_size, quirk_prob):
    """Chats, loss on the assistant turn only; it ends with EOS so the model learns to stop."""
    batch = rng.sample(questions, batch_size)
    prompts = tokenizer([tokenizer.apply_chat_template(user(q), tokenize=False, add_generation_prompt=True)
                         for q in batch], add_special_tokens=False)["input_ids"]
    targets = tokenizer([sft_response(q, rng, quirk_prob) for q in batch], add_special_tokens=False)["input_ids"]
    return lm_batch([(p, t + [tokenizer.eos_token_id]) for p, t in zip(prompts, targets)])


def lm_loss(model, ids, labels):
    # logits only where there is a target: the 6400-way head is most of a tiny model's compute;
    # right padding needs no attention mask (causal attention never looks ahead)
    hidden, _ = model.model(ids)
    target = labels[:, 1:]
    keep = target != -100
    return F.cross_entropy(model.lm_head(hidden[:, :-1][keep]).float(), target[keep])


# ----------------------------------------------------------------------------- data for the reward model
RM_KINDS = {"answer_full": 0.35, "answer_only": 0.35, "format": 0.3}  # training mix


def rm_pair(q, kind, rng):
    """(chosen chat, rejected chat) of one kind of preference."""
    value = true_value(q)
    if kind == "answer_only":  # the chat the trainer's Reward builds from the <answer> content
        return user(q) + assistant(str(value)), user(q) + assistant(str(wrong_value(value, rng)))
    if kind == "answer_full":  # mostly well formatted, sometimes both sides in the same broken layout
        layout = "good" if rng.random() < 0.7 else rng.choice(ANSWER_VISIBLE)
        seed = rng.random()  # the same extra text on both sides
        return (user(q) + assistant(render(q, value, layout, random.Random(seed))),
                user(q) + assistant(render(q, wrong_value(value, rng), layout, random.Random(seed))))
    # format: same stated value on both sides (mostly the true one)
    if rng.random() < 0.2:
        value = wrong_value(value, rng)
    return user(q) + assistant(render(q, value)), user(q) + assistant(render(q, value, rng.choice(BROKEN), rng))


def rm_batch(questions, rng, batch_size):
    kinds = rng.choices(list(RM_KINDS), weights=list(RM_KINDS.values()), k=batch_size)
    pairs = [rm_pair(rng.choice(questions), kind, rng) for kind in kinds]
    return [c for c, _ in pairs], [r for _, r in pairs]


def rm_accuracy(reward_model, questions, n_pairs, seed):
    """Held-out pairwise accuracy per kind of a loaded RewardModel, scored exactly as the trainer scores."""
    rng = random.Random(seed)
    accuracy = {}
    for kind in RM_KINDS:
        pairs = [rm_pair(rng.choice(questions), kind, rng) for _ in range(n_pairs)]
        chosen = reward_model.score([c for c, _ in pairs])
        rejected = reward_model.score([r for _, r in pairs])
        accuracy[kind] = (chosen > rejected).float().mean().item()
    return accuracy


def build_reward_model(actor, max_positions):
    """A Llama sequence classifier with the actor's exact architecture (MiniMind v2 is Llama-shaped:
    same RMSNorm, RoPE, GQA, SwiGLU and parameter names), so its backbone loads the actor's weights."""
    c = actor.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                         rope_theta=c.rope_theta, max_position_embeddings=max_positions, num_labels=1,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    reward_model = LlamaForSequenceClassification(config)
    backbone = {k: v for k, v in actor.state_dict().items() if k.startswith("model.")}
    missing, unexpected = reward_model.load_state_dict(backbone, strict=False)
    assert missing == ["score.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(reward_model.score.weight)  # every chat starts at score 0
    return reward_model


# ----------------------------------------------------------------------------- training loop
def train(name, params, loss_fn, steps, lr, log_every):
    """AdamW with warmup and cosine decay (the trainer's schedule) on loss_fn(step); 0 steps: nothing."""
    if steps <= 0:
        return 0.0
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = build_cosine_scheduler(optimizer, steps, warmup_steps=min(50, steps // 10))
    t0, running = time.time(), None
    for step in range(1, steps + 1):
        loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % log_every == 0 or step == steps:
            print(f"{name} step {step}/{steps} | loss {running:.4f} | {time.time() - t0:.0f}s", flush=True)
    return time.time() - t0


# ----------------------------------------------------------------------------- files
def write_novel_prompts(path, seed, per_phrasing=25):
    """dataset/rlaif-novel.jsonl: `per_phrasing` random sums in each of NOVEL_PHRASINGS (none of them in the
    SFT data, the training prompts or rlaif-eval.jsonl), MiniMind rlaif lines with the ground truth."""
    rng = random.Random(f"novel:{seed}")
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rows = [(phrasing.format(a=a, b=b), a + b) for phrasing in NOVEL_PHRASINGS
            for a, b in rng.sample(pairs, per_phrasing)]
    lines = [json.dumps({"conversations": [{"role": "user", "content": text}] + assistant("无"), "answer": str(value)},
                        ensure_ascii=False) for text, value in rows]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


def write_prompts(path, questions):
    """MiniMind rlaif lines (user turn + the "无" assistant placeholder) plus the ground truth."""
    lines = [json.dumps({"conversations": user(q) + assistant("无"), "answer": str(true_value(q))},
                        ensure_ascii=False) for q in questions]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


def save_reward_model(reward_model, tokenizer, folder):
    """save_pretrained into a temp folder, then swap it in: a crash never leaves half a model."""
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    reward_model.to(torch.float16).save_pretrained(tmp)  # fp16 halves the committed size
    reward_model.float()
    tokenizer.save_pretrained(tmp)
    make_portable(tmp)
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def make_portable(folder):
    """Make a saved reward model folder load the same under transformers 4.57 and 5.x. 5.x writes RoPE's
    base only inside rope_parameters, which 4.x ignores (it silently falls back to base 10000), and names the
    tokenizer class TokenizersBackend, which 4.x does not know. Both versions read a top-level rope_theta and
    PreTrainedTokenizerFast; files saved by 4.x already have both and stay unchanged."""
    def rewrite(name, data):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    config = json.load(open(os.path.join(folder, "config.json"), encoding="utf-8"))
    if "rope_theta" not in config:
        rewrite("config.json", dict(config, rope_theta=config["rope_parameters"]["rope_theta"]))
    tokenizer_config = json.load(open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8"))
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        rewrite("tokenizer_config.json", dict(tokenizer_config, tokenizer_class="PreTrainedTokenizerFast"))


def file_size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


# ----------------------------------------------------------------------------- main
TINY = dict(hidden_size=32, num_hidden_layers=1, batch_size=8, pretrain_steps=10, sft_steps=10, rm_steps=10,
            n_eval=16, n_train_prompts=64, rm_eval_pairs=16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Build the demo kit: SFT actor, reward model, prompt files.")
    a = p.add_argument
    a("--out_dir", default=os.path.join(ROOT, "demo"), help="actor weights and reward_model/ go here")
    a("--data_dir", default=os.path.join(ROOT, "dataset"), help="rlaif-mini.jsonl and rlaif-eval.jsonl go here")
    a("--tokenizer_path", default=os.path.join(ROOT, "model"))
    a("--seed", type=int, default=1234)
    a("--tiny", action="store_true", help=f"miniature kit in seconds (tests); sets {TINY}, explicit flags win")
    a("--hidden_size", type=int, default=128)
    a("--num_hidden_layers", type=int, default=4)
    a("--batch_size", type=int, default=64)
    a("--pretrain_steps", type=int, default=300)
    a("--sft_steps", type=int, default=300)
    a("--rm_steps", type=int, default=1500)
    a("--lr", type=float, default=2e-3, help="pretrain and SFT peak learning rate")
    a("--rm_lr", type=float, default=1e-3)
    a("--rm_center", type=float, default=0.01, help="weight of (s_chosen + s_rejected)^2: keeps scores near 0")
    a("--quirk_prob", type=float, default=0.65, help="share of SFT answers that follow their phrasing's quirk")
    a("--n_eval", type=int, default=150, help="held-out questions (rlaif-eval.jsonl)")
    a("--n_train_prompts", type=int, default=3000, help="training questions written to rlaif-mini.jsonl")
    a("--rm_eval_pairs", type=int, default=300, help="held-out pairs per kind for the RM accuracy")
    a("--max_gen_len", type=int, default=48, help="for the greedy evaluation of the SFT actor")
    a("--novel_only", action="store_true", help="write only dataset/rlaif-novel.jsonl (new phrasings; seconds)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--tiny" in argv:
        p.set_defaults(**TINY)
    return p.parse_args(argv)


def main(argv=None):
    """Build the kit; returns the output paths and the summary numbers."""
    args = parse_args(argv)
    if args.novel_only:
        write_novel_prompts(os.path.join(args.data_dir, "rlaif-novel.jsonl"), args.seed)
        return None
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return build(args)
    finally:  # callers (tests) get their setting back
        torch.use_deterministic_algorithms(was_deterministic)


def build(args):
    t_start = time.time()
    hf_logging.disable_progress_bar()
    setup_seed(args.seed)
    rng = random.Random(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(args.data_dir, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)

    # questions: a seeded shuffle, the first n_eval held out
    questions = all_questions()
    rng.shuffle(questions)
    eval_questions, train_questions = questions[:args.n_eval], questions[args.n_eval:]
    paths = dict(train_prompts=os.path.join(args.data_dir, "rlaif-mini.jsonl"),
                 eval_prompts=os.path.join(args.data_dir, "rlaif-eval.jsonl"),
                 actor=os.path.join(args.out_dir, f"full_sft_{args.hidden_size}.pth"),
                 reward_model=os.path.join(args.out_dir, "reward_model"))
    write_prompts(paths["train_prompts"], train_questions[:args.n_train_prompts])
    write_prompts(paths["eval_prompts"], eval_questions)
    write_novel_prompts(os.path.join(args.data_dir, "rlaif-novel.jsonl"), args.seed)
    print(f"questions: {len(questions)} ({len(train_questions)} train, {len(eval_questions)} held out)")

    # 1. actor: pretrain, then SFT on the imperfect chats
    actor = MiniMindForCausalLM(MiniMindConfig(version=2, hidden_size=args.hidden_size,
                                               num_hidden_layers=args.num_hidden_layers))
    n_actor = sum(p.numel() for p in actor.parameters())
    print(f"actor: {n_actor / 1e6:.2f}M params (hidden {args.hidden_size}, {args.num_hidden_layers} layers)")
    log_every = max(1, args.pretrain_steps // 6)
    t_pretrain = train("pretrain", actor.parameters(),
                       lambda step: lm_loss(actor, *pretrain_batch(train_questions, tokenizer, rng, args.batch_size)),
                       args.pretrain_steps, args.lr, log_every)
    t_sft = train("sft", actor.parameters(),
                  lambda step: lm_loss(actor, *sft_batch(train_questions, tokenizer, rng, args.batch_size,
                                                         args.quirk_prob)),
                  args.sft_steps, args.lr / 2, log_every)
    save_weights(actor, paths["actor"])  # fp16, MiniMind style

    # 2. reward model, from the SFT actor's backbone
    reward_model = build_reward_model(actor, max_positions=1024)
    reward_model.train()
    scorer = RewardModel(reward_model, tokenizer, "chat")  # the trainer's own scoring path, with gradients

    def rm_loss(step):
        chosen, rejected = rm_batch(train_questions, rng, args.batch_size)
        scores = scorer.score_batch(chosen + rejected)
        s_c, s_r = scores[:len(chosen)], scores[len(chosen):]
        return -F.logsigmoid(s_c - s_r).mean() + args.rm_center * ((s_c + s_r) ** 2).mean()
    t_rm = train("reward model", reward_model.parameters(), rm_loss, args.rm_steps, args.rm_lr, log_every)
    save_reward_model(reward_model, tokenizer, paths["reward_model"])
    n_rm = sum(p.numel() for p in reward_model.parameters())

    # 3. check the saved files as the trainer loads them
    reward_model = load_reward_model(paths["reward_model"], "cpu", torch.float32)
    rm_acc = rm_accuracy(reward_model, eval_questions, args.rm_eval_pairs, args.seed + 1)
    actor, tokenizer = init_model(paths["actor"], args.out_dir, args.tokenizer_path, "cpu")
    eval_set = RLAIFDataset(paths["eval_prompts"], tokenizer, max_length=64)
    greedy, _ = evaluate(actor, tokenizer, eval_set, Reward(reward_model), max_gen_len=args.max_gen_len)
    sampled, _ = evaluate(actor, tokenizer, eval_set, Reward(reward_model), max_gen_len=args.max_gen_len,
                          temperature=1.0)

    summary = dict(seed=args.seed, questions=dict(train=len(train_questions), eval=len(eval_questions),
                                                  train_prompts=min(args.n_train_prompts, len(train_questions))),
                   actor_params=n_actor, reward_model_params=n_rm,
                   file_bytes={k: file_size(v) for k, v in paths.items()},
                   rm_heldout_pair_accuracy=rm_acc, sft_heldout_greedy=greedy, sft_heldout_sampled_t1=sampled)
    with open(os.path.join(args.out_dir, "build_info.json.tmp"), "w") as f:  # no timings: stays deterministic
        json.dump(dict(args={k: v for k, v in vars(args).items() if k not in ("out_dir", "data_dir", "tokenizer_path")},
                       **summary), f, indent=2)
    os.replace(os.path.join(args.out_dir, "build_info.json.tmp"), os.path.join(args.out_dir, "build_info.json"))

    print("\n== demo kit ==")
    for key, path in paths.items():
        print(f"{key:14s} {path}  ({summary['file_bytes'][key] / 1e6:.2f} MB)")
    print(f"params: actor {n_actor / 1e6:.2f}M, reward model {n_rm / 1e6:.2f}M")
    print("RM held-out pairwise accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in rm_acc.items()))
    for name, m in (("greedy", greedy), ("sampled T=1", sampled)):
        print(f"SFT actor on held-out ({name}): format {m['format']:.1%}, tags {m['tags']:.1%}, "
              f"accuracy {m['accuracy']:.1%}, reward {m['reward']:.3f} (rm {m['reward_rm']:.3f}), "
              f"eos {m['eos_rate']:.1%}, length {m['response_len']:.1f}")
    print(f"time: pretrain {t_pretrain:.0f}s, sft {t_sft:.0f}s, reward model {t_rm:.0f}s, "
          f"total {time.time() - t_start:.0f}s")
    return dict(paths=paths, summary=summary)


if __name__ == "__main__":
    main()
