"""The documentation names real flags and links to real places.

Every `--flag` written in README.md or docs/*.md must be a flag of the program it is written for: in a command
line (a fenced block or an inline `code` span) the program the line runs (train_ppo.py, one of scripts/*.py,
torchrun); everywhere else train_ppo.py. The option strings come from the parsers themselves (captured when
the script calls parse_args), not from help text. Two places hold other programs' names on purpose:

- the columns of a table whose header is another framework's name (`verl`, `TRL`, `OpenRLHF`: the config-name
  maps of docs/data.md), which are not checked;
- OTHER_TOOLS below: flags of other programs mentioned in prose without their command line, allowed only in
  the file that mentions them.

Relative links (files and #anchors) must resolve too.
"""
import argparse
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(p for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")] if p.exists())

# Flags of other programs that a document mentions in prose, without a command line that names the program:
# allowed in that file only. Flags of this project's scripts and of torchrun are checked against their parsers
# below (test_other_tools_flags_exist); the others are the named tools' own.
OTHER_TOOLS = {
    "README.md": {
        "--input_key": "OpenRLHF", "--remote_rm_url": "OpenRLHF",
        "--shutdown_timeout": "torchrun", "--signal_delay": "scripts/bench_ppo.py",
        "--lengths": "scripts/bench_ppo.py", "--ablations": "scripts/bench_ppo.py", "--flops": "scripts/bench_ppo.py",
    },
    "docs/hf_ecosystem.md": {"--remote_rm_url": "OpenRLHF"},
    "docs/minimind.md": {  # minimind-3's trainer/train_grpo.py and trainer/train_agent.py
        "--loss_type": "minimind-3", "--epsilon": "minimind-3", "--beta": "minimind-3",
        "--num_generations": "minimind-3", "--max_total_len": "minimind-3",
    },
}
# the command-line tools other than this project's that the documents show commands of, with the flags used
EXTERNAL_PROGRAMS = {"hf": {"--local-dir"}, "pip": {"--index-url"}}
# a table column whose header is exactly one of these holds that framework's names, not this trainer's
FRAMEWORK_COLUMN = re.compile(r"^(verl|TRL|OpenRLHF)$", re.IGNORECASE)
FLAG = re.compile(r"(?<![\w`-])--[A-Za-z][\w-]*")
CODE_SPAN = re.compile(r"`([^`]+)`")


class _Captured(Exception):
    pass


def parser_options(build, *args):
    """The `--` option strings of the argparse parser that `build(*args)` makes: returned, or captured when it
    calls parse_args / parse_known_args (which then never parse anything)."""
    def capture(self, *a, **k):
        raise _Captured(self)

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    try:
        parser = build(*args)
    except _Captured as captured:
        parser = captured.args[0]
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    assert isinstance(parser, argparse.ArgumentParser), build
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


@pytest.fixture(scope="module")
def programs():
    """{program name: its flags}: train_ppo.py, the scripts, torchrun, and the external tools above."""
    import torch.distributed.run

    import scripts.bench_fsdp
    import scripts.bench_ppo
    import scripts.build_demo
    import scripts.eval_policy
    import scripts.plot_metrics
    import scripts.train_tokenizer
    import train_ppo
    return {
        "train_ppo.py": parser_options(train_ppo.parse_args, []),
        "eval_policy.py": parser_options(scripts.eval_policy.parser),
        "bench_ppo.py": parser_options(scripts.bench_ppo.parse_args, []),
        "bench_fsdp.py": parser_options(scripts.bench_fsdp.parse_args, []),
        "build_demo.py": parser_options(scripts.build_demo.parse_args, []),
        "plot_metrics.py": parser_options(scripts.plot_metrics.main, ["metrics.jsonl"]),
        "train_tokenizer.py": parser_options(scripts.train_tokenizer.main),
        "torchrun": parser_options(torch.distributed.run.get_args_parser),
        **EXTERNAL_PROGRAMS,
    }


def tokens(text):
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose: whitespace is enough to find flags
        return text.split()


def command_flags(text, programs, default="train_ppo.py"):
    """[(program, flag)] of a command line: each flag belongs to the last program named before it (a script's
    file name, torchrun, an external tool), or to `default` when none was named yet."""
    program, found = default, []
    for token in tokens(text):
        name = os.path.basename(token)
        if name in programs:
            program = name
        else:  # `--a/--b`, `--flag=value`, `(--flag)`: every flag in the token
            found += [(program, flag) for flag in FLAG.findall(token)]
    return found


def split_row(line):
    """The cells of a markdown table row (escaped pipes stay inside their cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def is_separator(line):
    return bool(re.fullmatch(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?", line.strip()))


def unknown_flags(text, programs, allowed=()):
    """[(line number, program, flag)] for every flag in a markdown text that its program does not have.
    `allowed`: other programs' flags this text may mention in prose."""
    bad = []

    def check(number, found, prose):
        for program, flag in found:
            if flag not in programs[program] and not (prose and flag in allowed):
                bad.append((number, program, flag))

    def check_prose(number, text):
        """Code spans (which may wrap lines) and bare flags of a paragraph or a table cell starting at line
        `number`."""
        line_of = lambda offset: number + text.count("\n", 0, offset)  # noqa: E731
        for span in CODE_SPAN.finditer(text):
            found = command_flags(span.group(1), programs)
            named = any(os.path.basename(t) in programs for t in tokens(span.group(1)))
            check(line_of(span.start()), found, prose=not named)
        bare = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)  # offsets kept
        for flag in FLAG.finditer(bare):
            check(line_of(flag.start()), [("train_ppo.py", flag.group(0))], prose=True)

    lines = text.splitlines() + [""]
    fence, command, skipped_columns, paragraph = None, "", set(), []
    for i, line in enumerate(lines):
        number = i + 1
        if paragraph and (fence is not None or not line.strip() or line.lstrip().startswith(("|", "```", "~~~", "#"))):
            check_prose(paragraph[0][0], "\n".join(text for _, text in paragraph))
            paragraph = []
        if fence is not None:  # a fenced block: shell lines, joined at trailing backslashes
            if line.strip().startswith(fence):
                fence = None
            elif line.rstrip().endswith("\\"):
                command += line.rstrip()[:-1] + " "
            else:
                check(number, command_flags(command + line, programs), prose=False)
                command = ""
        elif line.lstrip().startswith(("```", "~~~")):
            fence = line.lstrip()[:3]
        elif line.lstrip().startswith("|"):
            if i + 1 < len(lines) and is_separator(lines[i + 1]):  # a header row: which columns to skip
                skipped_columns = {k for k, cell in enumerate(split_row(line))
                                   if FRAMEWORK_COLUMN.match(cell.strip("`*_ "))}
            if not is_separator(line):
                for k, cell in enumerate(split_row(line)):
                    if k not in skipped_columns:
                        check_prose(number, cell)
        else:
            skipped_columns = set()
            if line.strip():
                paragraph.append((number, line))
    return bad


def test_the_check_can_fail(programs):
    """A misspelled flag fails, wherever it is written; another framework's flag passes only in its column."""
    text = "\n".join([
        "Use `--lerning_rate 1e-5` here, and --batch_sizee in prose.",
        "```bash",
        "python train_ppo.py --batch_size 8 \\",
        "    --mini_batch_sise 4",
        "torchrun --nproc_per_node 2 train_ppo.py --fsdp 1 --nproc_per_node 2",
        "python scripts/bench_ppo.py --preset small --memory --lora_critic 1",
        "```",
        "| OpenRLHF | this trainer |",
        "|---|---|",
        "| `--input_key` | `--prompt_key` |",
        "| `--prompt_key` | `--input_key` |",
        "A table ends here; `--input_key` in prose is not this trainer's.",
    ])
    assert [(n, f) for n, _, f in unknown_flags(text, programs)] == [
        (1, "--lerning_rate"), (1, "--batch_sizee"), (4, "--mini_batch_sise"), (5, "--nproc_per_node"),
        (6, "--lora_critic"), (11, "--input_key"), (12, "--input_key")]
    assert unknown_flags("`--input_key` in prose", programs, allowed={"--input_key"}) == []
    # an allowed name is still checked inside a command line that names its program
    assert unknown_flags("`python train_ppo.py --input_key x`", programs, allowed={"--input_key"}) != []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_in_the_docs_is_a_real_flag(path, programs):
    name = str(path.relative_to(ROOT))
    bad = unknown_flags(path.read_text(encoding="utf-8"), programs, OTHER_TOOLS.get(name, {}))
    assert not bad, "\n".join(f"{name}:{n}: {flag} is not a flag of {program}" for n, program, flag in bad)


def test_other_tools_flags_exist(programs):
    """The allow-list names other programs' flags: none of them is this trainer's, and those of this project's
    scripts and of torchrun are real."""
    for name, flags in OTHER_TOOLS.items():
        for flag, tool in flags.items():
            assert flag not in programs["train_ppo.py"], f"{name}: {flag} is train_ppo's own; drop it from OTHER_TOOLS"
            program = os.path.basename(tool)
            if program in programs:
                assert flag in programs[program], f"{name}: {flag} is not a flag of {tool}"


def test_train_ppo_parser_is_read_without_parsing(programs):
    """The capture returns the parser's own option strings, aliases included."""
    train = programs["train_ppo.py"]
    assert {"--batch_size", "--reward_fn", "--epsilon_high", "--use_wandb", "--help"} <= train
    assert "--nproc_per_node" in programs["torchrun"]


# ----------------------------------------------------------------------------- links
def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores dropped, spaces to
    hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    found, seen, fence = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            bad.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            bad.append(f"{target}: no heading with that anchor in {linked.name}")
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)



def test_every_key_a_run_logs_is_documented(tiny_kit, tmp_path):
    """Every key of metrics.jsonl (training and evaluation lines) and samples.jsonl that two tiny runs write (PPO
    with a critic and an evaluation; GRPO with dynamic sampling, overlong shaping and rollout correction) is in
    docs/metrics.md, reward parts under their `reward_<part>` patterns."""
    import json
    import train_ppo
    from conftest import tiny_run_args
    runs = {"ppo": ["--eval_data_path", tiny_kit["data"], "--eval_limit", "4"],
            "grpo": ["--adv_estimator", "grpo", "--n_samples_per_prompt", "2", "--batch_size", "2",
                     "--filter_groups", "1", "--rollout_is", "token", "--overlong_buffer_len", "4"]}
    keys = set()
    for name, flags in runs.items():
        train_ppo.main(train_ppo.parse_args(tiny_run_args(tiny_kit, tmp_path / name, "--max_steps", "1", *flags)))
        for file in ("metrics.jsonl", "samples.jsonl"):
            for line in open(tmp_path / name / file):
                keys |= set(json.loads(line))
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")

    def documented(key):
        for prefix in ("eval_reward_", "reward_"):
            if key.startswith(prefix):
                pattern = f"{prefix}<part>/<key>" if "/" in key else f"{prefix}<part>"
                return f"`{pattern}`" in text
        return f"`{key}`" in text
    assert {"filter_groups_kept", "rollout_is_mean", "reward_overlong", "eval_reward", "value_loss"} <= keys
    assert not [k for k in sorted(keys) if not documented(k)]
