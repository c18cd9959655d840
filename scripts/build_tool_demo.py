"""Build the tool-use demo kit, offline, on a CPU: a tiny model that cannot do the arithmetic it is asked,
but can call a calculator, and RL (GRPO) that teaches it to call the tool and copy the tool's result.

    python scripts/build_tool_demo.py             # full size: demo/tools/, ~8 min on 2 cores
    python scripts/build_tool_demo.py --tiny ...  # a miniature kit in seconds (tests)

and then GRPO on it (~6 min on 2 cores; greedy held-out accuracy 48% -> 99%, tool calls 65% -> 100%, at step 20 already):

    python train_ppo.py --from_weight demo/tools/full_sft_128.pth --tokenizer_path demo/tools/tokenizer \
        --data_path demo/tools/train.jsonl --eval_data_path demo/tools/eval.jsonl \
        --tools demo/tools/calculator.py --max_turns 2 --adv_estimator grpo --n_samples_per_prompt 4 \
        --batch_size 8 --mini_batch_size 32 --reward_model_path none --reasoning 0 --correctness_reward 1 \
        --max_gen_len 64 --kl_coef 0 --save_dir out/tools --eval_interval 20 --max_steps 100

The task: 3-digit x 2-digit products and 4-digit sums, asked in six English phrasings. A
1.6M-parameter model gets almost none of them right by itself. The good answer is two turns:
    turn 1: <tool_call>{"name": "calculator", "arguments": {"expression": "347 * 29"}}</tool_call>
    (the trainer runs the call and appends the result as a tool message)
    turn 2: 10063                                  (the tool's result, copied exactly)
Every (operation, a, b) pair goes either to training or to the held-out set, in all its phrasings.
Steps:
1. demo/tools/calculator.py: the tool (a safe `ast` walker for + - *, no eval).
2. demo/tools/tokenizer/: the project's tokenizer with a short ChatML chat template that lists tools in a
   system turn, asks for <tool_call>{json}</tool_call> and renders `tool` messages as
   <tool_response> user turns (Qwen's layout, fewer tokens: prompt length is CPU time).
3. train.jsonl / eval.jsonl: {"messages": [user question], "answer": "10063"} rows.
4. a tiny MiniMind actor (hidden 128, 4 layers) is pretrained on clean tool conversations, two to a row
   (loss on the policy's turns, on the prompt in a share of rows, never on the tool's results): copying
   numbers from the context is the skill it takes longest to find (~250 steps). It is then fine-tuned
   (SFT, loss on assistant tokens only) on conversations that are deliberately imperfect per phrasing
   (QUIRKS): two phrasings skip the tool and answer a plausible wrong number (--direct_prob), one writes
   the expression in words ("347 times 29": the calculator refuses it) and one writes broken JSON
   (--bad_call_prob); the other two are always good. Greedy decoding then starts well below 100% accuracy
   with a partial tool-call rate, while the good conversation keeps real probability mass under sampling
   for GRPO to find and reinforce.
   The turns' token ids are built exactly as the trainer builds them (multi_turn.continuation_ids).
5. the saved actor is measured as the trainer measures it (evaluation.evaluate with the calculator,
   two turns), greedy and sampled at temperature 1, into build_info.json.
"""
import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from collections import namedtuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from build_demo import train
from dataset.lm_dataset import RLAIFDataset
from evaluation import evaluate, generate
from model.loading import check_tokenizer_fit, init_model
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.policy import Policy
from multi_turn import check_tool_template, continuation_ids
from reward import is_correct
from tools import ToolRunner, parse_tool_calls
from trainer_utils import save_weights, setup_seed

# ----------------------------------------------------------------------------- the tool
# the tool's source is the kit's own file, written once: a rebuild elsewhere (--tiny, --out) copies it
CALCULATOR = os.path.join(ROOT, "demo", "tools", "calculator.py")

# ----------------------------------------------------------------------------- the chat template
# ChatML with tools, Qwen's layout made short. With tools= a system turn lists each tool as
# name(parameters): description and says how to call one; an assistant message's structured tool_calls (if
# any) are written as the policy writes them; a `tool` message is a user turn holding a <tool_response>.
CHAT_TEMPLATE = "".join([  # no newlines between the tags: transformers renders with trim_blocks and lstrip_blocks
    "{% set system = messages[0].content if (messages and messages[0].role == 'system') else none %}",
    "{% if tools or system is not none %}{{ '<|im_start|>system\n' }}",
    "{% if system is not none %}{{ system }}{% if tools %}{{ '\n' }}{% endif %}{% endif %}",
    "{% if tools %}{{ 'Tools:' }}{% for tool in tools %}",
    "{% set f = tool.function if tool.function is defined else tool %}",
    "{% set params = f.parameters.properties if (f.parameters is defined and f.parameters.properties is defined) else {} %}",
    "{{ '\n- ' ~ f.name ~ '(' ~ (params | list | join(', ')) ~ ')' }}",
    "{% if f.description %}{{ ': ' ~ f.description }}{% endif %}{% endfor %}",
    "{{ '\nCall a tool as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>' }}{% endif %}",
    "{{ '<|im_end|>\n' }}{% endif %}",
    "{% for message in messages %}",
    "{% if message.role == 'system' and loop.first %}",
    "{% elif message.role == 'tool' %}",
    "{{ '<|im_start|>user\n<tool_response>\n' ~ message.content ~ '\n</tool_response><|im_end|>\n' }}",
    "{% else %}{{ '<|im_start|>' ~ message.role ~ '\n' }}",
    "{% if message.content is string %}{{ message.content }}{% endif %}",
    "{% if message.role == 'assistant' and message.tool_calls %}{% for call in message.tool_calls %}",
    "{% set fn = call.function if call.function is defined else call %}",
    "{{ '<tool_call>{\"name\": \"' ~ fn.name ~ '\", \"arguments\": ' ~ "
    "(fn.arguments if fn.arguments is string else fn.arguments | tojson) ~ '}</tool_call>' }}",
    "{% endfor %}{% endif %}",
    "{{ '<|im_end|>\n' }}{% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
])

# ----------------------------------------------------------------------------- the task
# operation -> (word, (low, high) of a, (low, high) of b, function)
OPS = {"*": ("times", (100, 999), (10, 99), lambda a, b: a * b),
       "+": ("plus", (1000, 9999), (1000, 9999), lambda a, b: a + b)}
OP_WEIGHTS = {"*": 0.6, "+": 0.4}
PHRASINGS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "What is {a} {word} {b}?",
             "Calculate {a} {op} {b}.", "{a} {op} {b} = ?", "Please work out {a} {word} {b}."]
# What the SFT conversation of each phrasing does instead of the good one, with probability --direct_prob
# (direct) or --bad_call_prob (word_call, bad_json):
#   good:      nothing (always the good conversation)
#   direct:    no tool call; answers a plausible wrong number at once
#   word_call: calls the calculator with the expression in words ("347 times 29"): an error comes back,
#              then it guesses
#   bad_json:  a call whose JSON misses its closing brace: an error comes back, then it guesses
QUIRKS = ["good", "direct", "word_call", "good", "direct", "bad_json"]
TOOL = "calculator"

Question = namedtuple("Question", "op a b phrasing")


def question_text(q):
    return PHRASINGS[q.phrasing].format(a=q.a, b=q.b, op=q.op, word=OPS[q.op][0])


def true_value(q):
    return OPS[q.op][3](q.a, q.b)


def random_pair(rng):
    op = rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
    _, (a_lo, a_hi), (b_lo, b_hi), _ = OPS[op]
    return op, rng.randint(a_lo, a_hi), rng.randint(b_lo, b_hi)


def split_pairs(rng, n_eval, n_train):
    """Distinct (op, a, b) pairs: n_eval held out, n_train for training, none in both."""
    seen, eval_pairs, train_pairs = set(), [], []
    while len(eval_pairs) < n_eval or len(train_pairs) < n_train:
        pair = random_pair(rng)
        if pair in seen:
            continue
        seen.add(pair)
        (eval_pairs if len(eval_pairs) < n_eval else train_pairs).append(pair)
    return eval_pairs, train_pairs


def wrong_value(value, rng):
    """A plausible wrong result: the right number of digits (mostly), one or two digits off."""
    digits = list(str(value))
    for _ in range(rng.choice([1, 1, 2])):
        i = rng.randrange(len(digits))
        choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
        digits[i] = rng.choice(choices)
    return int("".join(digits))


def tool_call_text(expression, broken=False):
    call = json.dumps({"name": TOOL, "arguments": {"expression": expression}})
    return f"<tool_call>{call[:-1] if broken else call}</tool_call>"


def conversation(q, behaviour, rng):
    """The assistant turns' texts of one behaviour on one question; with two turns, the tool's result goes
    between them."""
    if behaviour == "direct":
        return [str(wrong_value(true_value(q), rng))]
    if behaviour == "good":
        return [tool_call_text(f"{q.a} {q.op} {q.b}"), str(true_value(q))]
    if behaviour == "word_call":
        return [tool_call_text(f"{q.a} {OPS[q.op][0]} {q.b}"), str(wrong_value(true_value(q), rng))]
    if behaviour == "bad_json":
        return [tool_call_text(f"{q.a} {q.op} {q.b}", broken=True), str(wrong_value(true_value(q), rng))]
    raise ValueError(behaviour)


def sft_behaviour(q, rng, quirk_probs):
    quirk = QUIRKS[q.phrasing]
    return quirk if quirk != "good" and rng.random() < quirk_probs[quirk] else "good"


# ----------------------------------------------------------------------------- token sequences
class Renderer:
    """Token ids of whole conversations exactly as the trainer builds them (multi_turn.sample_with_tools):
    the rendered prompt, each policy turn's own tokens and its stop token, and between turns the template's
    text for the tool results and the next generation prompt (multi_turn.continuation_ids)."""

    def __init__(self, tokenizer, schemas, runner):
        self.tokenizer, self.schemas, self.runner = tokenizer, schemas, runner
        self.stop = tokenizer.eos_token_id  # <|im_end|>
        self.stop_text = tokenizer.decode([self.stop])
        self.results = {}

    def result(self, call_text):
        if call_text not in self.results:
            self.results[call_text] = self.runner.run(parse_tool_calls(call_text)[0])
        return self.results[call_text]

    def pieces(self, q, turns):
        """[(ids, kind)] with kind 'prompt', 'policy' (the model's own tokens) or 'tool' (template and results)."""
        chat = [{"role": "user", "content": question_text(q)}]
        prompt = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                                    tools=self.schemas)
        out = [(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], "prompt")]
        history = list(chat)
        for k, text in enumerate(turns):
            out.append((self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.stop], "policy"))
            if k < len(turns) - 1:
                results = [{"role": "tool", "name": TOOL, "content": self.result(text)}]
                more = continuation_ids(self.tokenizer, history, results, self.schemas, {}, self.stop_text)
                out.append((more, "tool"))
                history += [{"role": "assistant", "content": text}] + results
        return out


def lm_batch(sequences, trained_kinds):
    """sequences: piece lists -> right-padded ids and labels (-100 = no loss) with loss on the pieces whose kind
    is in `trained_kinds` (one set for every row, or one per row)."""
    if isinstance(trained_kinds, tuple):
        trained_kinds = [trained_kinds] * len(sequences)
    rows = [[(ids, kind in kinds) for ids, kind in pieces] for pieces, kinds in zip(sequences, trained_kinds)]
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # pad id 0
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for piece, trained in row:
            ids[r, at:at + len(piece)] = torch.tensor(piece)
            if trained:
                labels[r, at:at + len(piece)] = torch.tensor(piece)
            at += len(piece)
    labels[:, 0] = -100  # the first token has nothing to be predicted from
    return ids, labels


def lm_loss(model, ids, labels):
    # logits only where there is a target: the 6400-way head is most of a tiny model's compute
    hidden, _ = model.model(ids)
    target = labels[:, 1:]
    keep = target != -100
    return F.cross_entropy(model.lm_head(hidden[:, :-1][keep]).float(), target[keep])


def sample_question(rng, eval_pairs):
    while True:
        pair = random_pair(rng)
        if pair not in eval_pairs:
            return Question(*pair, rng.randrange(len(PHRASINGS)))


def pretrain_batch(renderer, bare, rng, eval_pairs, batch_size, prompt_share, packed):
    """Clean conversations (always the good behaviour), `packed` to a row: the first as the trainer renders it
    (tools listed in the system turn), the others without the system turn (`bare`: the same layout from the
    question on, at a third of the length). Loss on the policy's turns; on the first prompt too in a share of
    the rows (the trainer's tokenizer check wants prompts read as text; the system turn is the same every
    time, so a few rows are enough); never on the tool's results (to be copied, not computed). Several
    conversations to a row give more copies per token: copying numbers from the context (induction heads)
    is what takes a tiny model longest."""
    rows, kinds = [], []
    for _ in range(batch_size):
        row = []
        for k in range(packed):
            q = sample_question(rng, eval_pairs)
            pieces = (renderer if k == 0 else bare).pieces(q, conversation(q, "good", rng))
            row += pieces if k == 0 else [(ids, "bare_" + kind) for ids, kind in pieces]
        rows.append(row)
        kinds.append(("policy", "bare_policy") + (("prompt",) if rng.random() < prompt_share else ()))
    return lm_batch(rows, kinds)


def sft_batch(renderer, rng, eval_pairs, batch_size, quirk_probs):
    """The imperfect conversations (QUIRKS), loss on the policy's turns only."""
    questions = [sample_question(rng, eval_pairs) for _ in range(batch_size)]
    return lm_batch([renderer.pieces(q, conversation(q, sft_behaviour(q, rng, quirk_probs), rng))
                     for q in questions], ("policy",))


# ----------------------------------------------------------------------------- files
def write_text(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_rows(path, pairs, rng):
    """One row per pair, in a random phrasing: {"messages": [user], "answer": "..."}."""
    lines = []
    for pair in pairs:
        q = Question(*pair, rng.randrange(len(PHRASINGS)))
        lines.append(json.dumps({"messages": [{"role": "user", "content": question_text(q)}],
                                 "answer": str(true_value(q))}))
    write_text(path, "\n".join(lines) + "\n")


def write_tokenizer(folder):
    """The project's tokenizer.json as it is, and its tokenizer_config.json with the tool template."""
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(os.path.join(ROOT, "model", "tokenizer.json"), os.path.join(folder, "tokenizer.json"))
    config = json.load(open(os.path.join(ROOT, "model", "tokenizer_config.json"), encoding="utf-8"))
    config["chat_template"] = CHAT_TEMPLATE
    write_text(os.path.join(folder, "tokenizer_config.json"), json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def file_size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


def phrasing_of(text):
    """The index of the phrasing a question is asked in."""
    for k, template in enumerate(PHRASINGS):
        pattern = re.escape(template)
        for field, value in (("a", r"\d+"), ("b", r"\d+"), ("op", "[-+*]"), ("word", "|".join(w for w, *_ in OPS.values()))):
            pattern = pattern.replace(re.escape("{%s}" % field), f"(?:{value})")
        if re.fullmatch(pattern, text):
            return k
    raise ValueError(f"no phrasing matches {text!r}")


def per_phrasing(samples, tool_use):
    """Greedy accuracy and tool-call rate per phrasing (with its quirk): where the SFT model goes wrong."""
    table = {}
    for sample, transcript, calls in zip(samples, tool_use["transcripts"], tool_use["tool_calls"].tolist()):
        k = phrasing_of(sample["messages"][-1]["content"])
        row = table.setdefault(k, dict(phrasing=PHRASINGS[k], quirk=QUIRKS[k], n=0, accuracy=0.0, tool_call_rate=0.0))
        row["n"] += 1
        row["accuracy"] += is_correct(transcript[-1]["content"], sample["answer"])
        row["tool_call_rate"] += calls > 0
    for row in table.values():
        row["accuracy"] /= row["n"]
        row["tool_call_rate"] /= row["n"]
    return [table[k] for k in sorted(table)]


def measure(paths, schemas, runner, max_gen_len, check_fit=True):
    """The saved actor as the trainer loads it: its tokenizer check, and the held-out metrics of
    evaluation.evaluate with the calculator (two turns), greedy and sampled at temperature 1, and greedy
    per phrasing."""
    actor, tokenizer = init_model(paths["actor"], os.path.dirname(paths["actor"]), paths["tokenizer"], "cpu")
    eval_set = RLAIFDataset(paths["eval"], tokenizer, max_length=None, tools=schemas).samples
    fit = check_tokenizer_fit(Policy(actor), [s["prompt_ids"] for s in eval_set[:8]], tokenizer.pad_token_id,
                              paths["tokenizer"], paths["actor"]) if check_fit else "skipped"
    result = dict(tokenizer_check=fit)
    for name, temperature in (("greedy", 0.0), ("sampled_t1", 1.0)):
        result[f"sft_heldout_{name}"], _ = evaluate(actor, tokenizer, eval_set, max_gen_len=max_gen_len,
                                                    temperature=temperature, tool_runner=runner, max_turns=2)
        *_, tool_use = generate(actor, tokenizer, eval_set, 64, max_gen_len, "cpu", temperature, tool_runner=runner,
                                max_turns=2)  # the same responses (same seed), kept per phrasing
        result[f"sft_heldout_{name}_per_phrasing"] = per_phrasing(eval_set, tool_use)
    return result


def report(measured):
    print(measured["tokenizer_check"])
    for name in ("greedy", "sampled_t1"):
        m = measured[f"sft_heldout_{name}"]
        print(f"SFT actor on held-out ({name}): accuracy {m['accuracy']:.1%}, tool calls {m['tool_call_rate']:.1%} "
              f"({m['tool_calls']:.2f}/response, errors {m['tool_errors']:.2f}), unfinished "
              f"{m['unfinished_rate']:.1%}, eos {m['eos_rate']:.1%}, length {m['response_len']:.1f}")
    print("per phrasing (greedy | sampled T=1):")
    for g, t in zip(measured["sft_heldout_greedy_per_phrasing"], measured["sft_heldout_sampled_t1_per_phrasing"]):
        print(f"  {g['phrasing']:32s} {g['quirk']:9s} n={g['n']:3d} | accuracy {g['accuracy']:6.1%} tool calls "
              f"{g['tool_call_rate']:6.1%} | accuracy {t['accuracy']:6.1%} tool calls {t['tool_call_rate']:6.1%}")


# ----------------------------------------------------------------------------- main
TINY = dict(hidden_size=32, num_hidden_layers=1, batch_size=8, pretrain_steps=4, sft_steps=4, n_eval=12,
            n_train=48, max_gen_len=24)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Build the tool-use demo kit: calculator tool, tokenizer with a tool "
                                            "template, prompts, SFT actor.")
    a = p.add_argument
    a("--out", default=os.path.join(ROOT, "demo", "tools"), help="everything goes here")
    a("--seed", type=int, default=1234)
    a("--tiny", action="store_true", help=f"miniature kit in seconds (tests); sets {TINY}, explicit flags win")
    a("--hidden_size", type=int, default=128)
    a("--num_hidden_layers", type=int, default=4)
    a("--batch_size", type=int, default=32)
    a("--pretrain_steps", type=int, default=320, help="steps on clean conversations")
    a("--packed", type=int, default=2, help="clean conversations to a pretraining row (pretrain_batch)")
    a("--sft_steps", type=int, default=150, help="steps on the imperfect conversations")
    a("--lr", type=float, default=2e-3, help="pretrain peak learning rate (SFT: half)")
    a("--prompt_share", type=float, default=0.25, help="share of pretraining rows with loss on the prompt too")
    a("--direct_prob", type=float, default=0.85,
      help="share of SFT conversations of the 'direct' phrasings that skip the tool (high: a direct answer's first "
           "digit is spread over several, so greedy decoding only answers directly when most conversations do)")
    a("--bad_call_prob", type=float, default=0.8,
      help="share of SFT conversations of the 'word_call' and 'bad_json' phrasings that make their bad call")
    a("--n_eval", type=int, default=150, help="held-out questions (eval.jsonl)")
    a("--n_train", type=int, default=2000, help="training questions (train.jsonl)")
    a("--max_gen_len", type=int, default=64, help="tokens per turn for the evaluation of the SFT actor")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--tiny" in argv:
        p.set_defaults(**TINY)
    return p.parse_args(argv)


def main(argv=None):
    """Build the kit; returns the output paths and the summary numbers."""
    args = parse_args(argv)
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
    os.makedirs(args.out, exist_ok=True)
    paths = dict(tool=os.path.join(args.out, "calculator.py"), tokenizer=os.path.join(args.out, "tokenizer"),
                 train=os.path.join(args.out, "train.jsonl"), eval=os.path.join(args.out, "eval.jsonl"),
                 actor=os.path.join(args.out, f"full_sft_{args.hidden_size}.pth"))

    # 1-3. the tool, the tokenizer with its template, the prompts
    if os.path.abspath(paths["tool"]) != CALCULATOR:
        shutil.copy(CALCULATOR, paths["tool"])
    write_tokenizer(paths["tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    runner = ToolRunner(paths["tool"], 5, 2048)
    try:
        schemas = runner.schemas
        check_tool_template(tokenizer, schemas, {}, [tokenizer.eos_token], "build_tool_demo")
        eval_pairs, train_pairs = split_pairs(rng, args.n_eval, args.n_train)
        write_rows(paths["train"], train_pairs, rng)
        write_rows(paths["eval"], eval_pairs, rng)
        eval_pairs = set(eval_pairs)
        renderer, bare = Renderer(tokenizer, schemas, runner), Renderer(tokenizer, None, runner)
        quirk_probs = dict(direct=args.direct_prob, word_call=args.bad_call_prob, bad_json=args.bad_call_prob)
        example = sample_question(random.Random(0), eval_pairs)
        prompt_len = len(renderer.pieces(example, ["x"])[0][0])
        print(f"questions: {len(train_pairs)} train, {len(eval_pairs)} held out; prompt ~{prompt_len} tokens")

        # 4. actor: pretrain on clean conversations, then SFT on the imperfect ones
        actor = MiniMindForCausalLM(MiniMindConfig(version=2, hidden_size=args.hidden_size,
                                                   num_hidden_layers=args.num_hidden_layers))
        n_actor = sum(p.numel() for p in actor.parameters())
        print(f"actor: {n_actor / 1e6:.2f}M params (hidden {args.hidden_size}, {args.num_hidden_layers} layers)")
        log_every = max(1, args.pretrain_steps // 6)
        t_pretrain = train("pretrain", actor.parameters(),
                           lambda step: lm_loss(actor, *pretrain_batch(renderer, bare, rng, eval_pairs, args.batch_size,
                                                                    args.prompt_share, args.packed)),
                           args.pretrain_steps, args.lr, log_every)
        t_sft = train("sft", actor.parameters(),
                      lambda step: lm_loss(actor, *sft_batch(renderer, rng, eval_pairs, args.batch_size,
                                                             quirk_probs)),
                      args.sft_steps, args.lr / 2, log_every)
        save_weights(actor, paths["actor"])  # fp16, MiniMind style

        # 5. the saved actor as the trainer loads and evaluates it
        t_eval = time.time()
        measured = measure(paths, schemas, runner, args.max_gen_len, check_fit=not args.tiny)
        t_eval = time.time() - t_eval
    finally:
        runner.close()

    summary = dict(seed=args.seed, questions=dict(train=len(train_pairs), eval=len(eval_pairs)),
                   prompt_tokens=prompt_len, actor_params=n_actor,
                   file_bytes={k: file_size(v) for k, v in paths.items()}, **measured)
    write_text(os.path.join(args.out, "build_info.json"),  # no timings: stays deterministic
               json.dumps(dict(args={k: v for k, v in vars(args).items() if k != "out"}, **summary), indent=2) + "\n")

    print("\n== tool-use demo kit ==")
    for key, path in paths.items():
        print(f"{key:10s} {path}  ({summary['file_bytes'][key] / 1e6:.2f} MB)")
    print(f"params: actor {n_actor / 1e6:.2f}M")
    report(measured)
    print(f"time: pretrain {t_pretrain:.0f}s, sft {t_sft:.0f}s, eval {t_eval:.0f}s, total {time.time() - t_start:.0f}s")
    return dict(paths=paths, summary=summary)


if __name__ == "__main__":
    main()
