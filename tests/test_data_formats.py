"""Other frameworks' data and rewards (issue 25): jsonl, json, parquet and save_to_disk folders read through
`datasets`; the prompt and ground-truth columns found by key (dotted paths included); verl's, TRL's and
OpenRLHF's reward-function signatures and verl's data_source routing; bad input stopped at start-up, before any
model, naming file, row and key; and the README's "Coming from verl, TRL or OpenRLHF" commands run end to end
on a tiny model, each logged reward checked against the function applied to the logged response and the row."""
import json
import re
import socket

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

import data_formats_kit as kit
import train_ppo
from conftest import tiny_run_args
from dataset.formats import MISSING, label_text, read_table, resolve
from dataset.lm_dataset import PromptCollator, RLAIFDataset
from reward import Reward
from reward_functions import check_labels, NonFiniteRolloutError, RewardFunction, reward_parts

ROOT = kit.ROOT
CHAT = [{"role": "user", "content": "What is 7 + 5?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "model")


def write_rows(path, rows, kind):
    """rows as `kind`: jsonl (Python's json), json (an array), parquet or save_to_disk (datasets)."""
    import datasets
    path = str(path)
    if kind == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    elif kind == "json":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(path)
    return path


def functions_file(tmp_path, source, name="fns.py"):
    path = tmp_path / name
    path.write_text(source)
    return str(path)


# ----------------------------------------------------------------------------- readers
@pytest.mark.parametrize("kind", ["json", "parquet", "save_to_disk", "json lines in a .json file"])
def test_every_format_gives_the_items_jsonl_gives(tmp_path, tokenizer, kind):
    rows = kit.verl_rows("train")[:5]
    reference = RLAIFDataset(write_rows(tmp_path / "rows.jsonl", rows, "jsonl"), tokenizer, max_length=64)
    if kind == "json lines in a .json file":
        path = write_rows(tmp_path / "rows.json", rows, "jsonl")
    else:
        path = write_rows(tmp_path / f"rows.{kind}", rows, kind)
    ds = RLAIFDataset(path, tokenizer, max_length=64)
    assert (ds.prompt_key, ds.label_key, ds.chat) == ("prompt", "reward_model.ground_truth", True)
    for item, expected, row in zip(ds.samples, reference.samples, rows):
        assert item["prompt"] == expected["prompt"] and item["prompt_ids"] == expected["prompt_ids"]
        assert item["answer"] == row["reward_model"]["ground_truth"] == expected["answer"]
        assert item["messages"] == row["prompt"]
        assert item["row"] == {k: v for k, v in row.items() if k != "prompt"} == expected["row"]
    assert reference.wheres[0] == f"{tmp_path / 'rows.jsonl'}:1"
    assert ds.wheres[0] == (f"{path}:1" if kind.startswith("json lines") else f"{path}: row 0")
    batch = PromptCollator(tokenizer.pad_token_id)(ds.samples[:2])
    assert batch["rows"] == [ds[0]["row"], ds[1]["row"]] and batch["rows"][1]["extra_info"]["index"] == 1


def test_one_split_of_a_saved_dataset_dict_and_folders_that_are_not(tmp_path, tokenizer):
    import datasets
    data = datasets.Dataset.from_list([{"prompt": "one plus one is", "answer": "2"}])
    datasets.DatasetDict(train=data, test=data).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"dict: a DatasetDict with splits train, test; point the path at one "
                                         r"split's folder, e\.g\. \S+dict/train"):
        RLAIFDataset(tmp_path / "dict", tokenizer)
    assert RLAIFDataset(tmp_path / "dict" / "train", tokenizer).answers == ["2"]
    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(ValueError, match=r"plain_folder: a folder, but not one written by datasets' save_to_disk"):
        RLAIFDataset(tmp_path / "plain_folder", tokenizer)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake\.parquet: not a readable parquet file"):
        RLAIFDataset(tmp_path / "fake.parquet", tokenizer)


def test_reading_is_offline_and_writes_nothing_beside_the_data_or_in_the_cache(tmp_path, tokenizer, monkeypatch):
    import datasets
    rows = [{"prompt": CHAT, "answer": "12"}] * 3
    paths = [write_rows(tmp_path / f"data.{kind}", rows, kind) for kind in ("jsonl", "json", "parquet")]
    paths.append(write_rows(tmp_path / "saved", rows, "save_to_disk"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cache = datasets.config.HF_DATASETS_CACHE
    cached = sorted(cache.rglob("*")) if cache.exists() else []

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    settings = datasets.are_progress_bars_disabled(), datasets.config.HF_HUB_OFFLINE
    for path in paths:
        assert RLAIFDataset(path, tokenizer).answers == ["12"] * 3
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == cached
    assert (datasets.are_progress_bars_disabled(), datasets.config.HF_HUB_OFFLINE) == settings  # restored


def test_jsonl_that_datasets_misreads_is_read_line_by_line(tmp_path, tokenizer):
    """A line datasets would turn into other rows (an array, two objects) is named; a column of mixed types,
    which datasets decodes through its catch-all Json type ("12" -> 12), keeps the file's values."""
    good = json.dumps({"prompt": "one plus one is"})
    for line, reason in [('["one plus one is"]', "record must be a JSON object, got list"),
                         (good + " " + good, "invalid JSON: Extra data")]:
        path = tmp_path / "bad.jsonl"
        path.write_text(good + "\n\n" + line + "\n")
        with pytest.raises(ValueError, match="^" + re.escape(f"{path}:3: {reason}")):
            RLAIFDataset(path, tokenizer)
    path = write_rows(tmp_path / "mixed.jsonl", [{"prompt": "a is", "ground_truth": "12"},
                                                 {"prompt": "b is", "ground_truth": 5, "extra": [1]},
                                                 {"prompt": "c is", "ground_truth": 0.5, "extra": "x"}], "jsonl")
    ds = RLAIFDataset(path, tokenizer)
    assert ds.answers == ["12", "5", "0.5"] and ds.labels == ["12", 5, 0.5]
    assert [r.get("extra") for r in ds.rows] == [None, [1], "x"]


def test_ground_truths_become_strings_but_answer_stays_a_string_field(tmp_path, tokenizer):
    path = write_rows(tmp_path / "ints.parquet", [{"prompt": "a is", "ground_truth": 12},
                                                  {"prompt": "b is", "ground_truth": None}], "parquet")
    ds = RLAIFDataset(path, tokenizer)
    assert ds.answers == ["12", ""] and ds.labels == [12, None]
    # pyarrow reads 12 beside 0.5 as 12.0: still the integer's text
    ds = RLAIFDataset(write_rows(tmp_path / "f.jsonl", [{"prompt": "a is", "solution": 12},
                                                       {"prompt": "b is", "solution": 0.5}], "jsonl"), tokenizer)
    assert ds.label_key == "solution" and ds.answers == ["12", "0.5"]
    assert [label_text(v) for v in ("7", 7, 7.0, 2.5, True, ["7", "seven"], MISSING, None)] == \
        ["7", "7", "7", "2.5", "true", '["7", "seven"]', "", ""]
    path = write_rows(tmp_path / "answer.parquet", [{"prompt": "a is", "answer": 12}], "parquet")
    with pytest.raises(ValueError, match=r"answer\.parquet: row 0: 'answer' must be a string, got int \(write it "
                                         r"as a JSON string: \"12\"\)"):
        RLAIFDataset(path, tokenizer)


def test_prompt_and_label_keys_auto_detected_in_order_or_named(tmp_path, tokenizer):
    both = [{"prompt": "plain text", "messages": CHAT + [{"role": "assistant", "content": "12"}],
             "solution": "s", "ground_truth": "g", "reward_model": {"ground_truth": "r"}}]
    ds = RLAIFDataset(write_rows(tmp_path / "a.jsonl", both, "jsonl"), tokenizer)
    assert (ds.prompt_key, ds.label_key, ds.answers) == ("messages", "reward_model.ground_truth", ["r"])  # verl's row
    assert ds.messages == [CHAT] and "12" not in ds[0]["prompt"]  # TRL's completion is dropped
    assert set(ds[0]["row"]) == {"prompt", "solution", "ground_truth", "reward_model"}
    ds = RLAIFDataset(tmp_path / "a.jsonl", tokenizer, prompt_key="prompt", label_key="reward_model.ground_truth")
    assert (ds.chat, ds[0]["prompt"], ds.answers) == (False, "plain text", ["r"])
    assert "messages" in ds[0]["row"] and "prompt" not in ds[0]["row"]
    row = {"a.b": 1, "a": {"b": 2, "c": {"d": 3}}, "n": None}
    assert (resolve(row, "a.b"), resolve(row, "a.c.d"), resolve(row, "a.x"), resolve(row, "n")) == (1, 3, MISSING,
                                                                                                    MISSING)
    ds = RLAIFDataset(write_rows(tmp_path / "q.jsonl", [{"question": "2 + 2 =", "meta": {"gold": 4}}], "jsonl"),
                      tokenizer, prompt_key="question", label_key="meta.gold")
    assert (ds[0]["prompt"], ds.answers, ds.labels, ds[0]["row"]) == ("2 + 2 =", ["4"], [4], {"meta": {"gold": 4}})
    ds = RLAIFDataset(write_rows(tmp_path / "none.jsonl", [{"prompt": "x is"}], "jsonl"), tokenizer)
    assert ds.label_key is None and ds.answers == [""] and ds[0]["row"] == {}


def test_verl_rows_take_their_ground_truth_and_ambiguous_labels_stop(tmp_path, tokenizer):
    """A verl parquet that kept a worked `solution` column: reward_model.ground_truth is the ground truth (the
    solution would score right answers 0); rows that are not verl's with two candidate columns that differ stop
    the load naming both; two that agree are fine. extra_info reaches compute_score as a dict, {} without one."""
    rows = [dict(row, solution="Natalia sold 48 / 2 = 24 clips in May, 48 + 24 = 72 in all.")
            for row in kit.verl_rows("train")[:3]]
    rows[1].pop("extra_info")
    ds = RLAIFDataset(write_rows(tmp_path / "verl.parquet", rows, "parquet"), tokenizer)
    assert ds.label_key == "reward_model.ground_truth"
    assert ds.answers == [str(r["reward_model"]["ground_truth"]) for r in rows]
    (tmp_path / "fn.py").write_text("seen = []\n\ndef compute_score(data_source, solution_str, ground_truth, "
                                    "extra_info=None):\n    seen.append(extra_info)\n    return 0.0\n")
    fn = RewardFunction(f"{tmp_path / 'fn.py'}:compute_score")
    check_labels(ds, [fn], 0.0)
    fn(["p"] * 3, ["r"] * 3, ds.answers, rows=ds.rows)
    seen = fn.fn.__globals__["seen"]
    assert seen[0] == rows[0]["extra_info"] and seen[1] == {}
    two = [{"prompt": "q1", "answer": "72", "solution": "48 + 24 = 72"}, {"prompt": "q2", "answer": "5"}]
    with pytest.raises(ValueError, match=r"two.jsonl:1: 2 columns could be the ground truth and differ \(answer = "
                                         r"'72', solution = '48 \+ 24 = 72'\); .*--label_key answer or --label_key "
                                         r"solution"):
        RLAIFDataset(write_rows(tmp_path / "two.jsonl", two, "jsonl"), tokenizer)
    two[0]["solution"] = "72"
    assert RLAIFDataset(write_rows(tmp_path / "same.jsonl", two, "jsonl"), tokenizer).label_key == "answer"
    assert RLAIFDataset(tmp_path / "two.jsonl", tokenizer, label_key="solution").answers == ["48 + 24 = 72", ""]


# ----------------------------------------------------------------------------- signatures
SIGNATURES = '''
import torch
calls = []

def verl_fn(data_source, solution_str, ground_truth, extra_info=None):
    calls.append(dict(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth,
                      extra_info=extra_info))
    if data_source == "float":
        return len(solution_str)
    return {"score": 1.0 + len(solution_str), "acc": float(str(ground_truth) in solution_str), "pred": "x",
            "flag": True}

def verl_gsm8k(solution_str, ground_truth, method="strict"):
    return float(ground_truth in solution_str)

def trl_fn(prompts, completions, **kwargs):
    calls.append(dict(prompts=prompts, completions=completions, **kwargs))
    return [None if k == "skip" else 2.0 for k in kwargs["kind"]]

def trl_named(completions, ground_truth, trainer_state=None):
    return [float(g == c) for g, c in zip(ground_truth, completions)]

def trl_state(prompts, completions, trainer_state, **kwargs):
    return [0.0] * len(prompts)

def openrlhf_fn(queries, prompts, labels):
    calls.append(dict(queries=queries, prompts=prompts, labels=labels))
    return {"rewards": torch.tensor([float(len(q)) for q in queries]), "scores": torch.ones(len(queries)),
            "extra_logs": {"label_len": torch.tensor([float(len(str(x))) for x in labels]),
                           "scalar": torch.tensor(1.0)}}

def openrlhf_tensor(queries, prompts, labels):
    return torch.tensor([[1.0]] * len(queries))

def unknown(texts, scores):
    return scores

def verl_raises(data_source, solution_str, ground_truth, extra_info=None):
    if "bad" in solution_str:
        raise KeyError("bad sample")
    return 0.0

def trl_raises(prompts, completions, **kwargs):
    if any("bad" in c for c in completions):
        raise KeyError("bad sample")
    return [0.0] * len(completions)

def verl_no_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1.0}

def verl_nan(data_source, solution_str, ground_truth, extra_info=None):
    return float("nan")
'''


def load(tmp_path, name, source=None):
    path = functions_file(tmp_path, SIGNATURES)
    fn = RewardFunction(f"{source}={path}:{name}" if source else f"{path}:{name}")
    return fn, fn.fn.__globals__["calls"]


def test_verl_signature_per_sample_with_the_rows_fields_and_diagnostics_outside_the_total(tmp_path):
    fn, calls = load(tmp_path, "verl_fn")
    fn.label_key = "reward_model.ground_truth"
    rows = [{"data_source": "gsm8k", "reward_model": {"ground_truth": 12}, "extra_info": {"index": 0}},
            {"data_source": "float", "reward_model": {"ground_truth": "3"}, "extra_info": {"index": 1}}]
    total, parts = Reward(None, reasoning=False, functions=[fn])(["p0", "p1"], ["a12", "xyz3"], ["12", "3"],
                                                                  rows=rows)
    assert fn.kind == "verl" and calls == [
        dict(data_source="gsm8k", solution_str="a12", ground_truth=12, extra_info={"index": 0}),
        dict(data_source="float", solution_str="xyz3", ground_truth="3", extra_info={"index": 1})]
    assert set(parts) == {"custom", "custom/acc", "custom/flag"}  # "pred" is not a number
    assert parts["custom"].tolist() == [4.0, 4.0] and parts["custom/acc"].tolist() == [1.0, 0.0]  # 0: no dict
    assert parts["custom/flag"].tolist() == [1.0, 0.0] and total.tolist() == [4.0, 4.0]
    # without rows (a direct call) the ground truth is the string answer; a gsm8k-style scorer takes what it names
    calls.clear()
    Reward(None, reasoning=False, functions=[fn])(["p"], ["r"], ["7"])
    assert calls == [dict(data_source=None, solution_str="r", ground_truth="7", extra_info={})]  # a dict, as verl
    gsm8k, _ = load(tmp_path, "verl_gsm8k")
    assert gsm8k.kind == "verl" and gsm8k(["p"], ["is 7"], ["7"]).tolist() == [1.0]


def test_trl_signature_follows_trls_conversational_and_standard_conventions(tmp_path):
    fn, calls = load(tmp_path, "trl_fn")
    rows = [{"kind": "a", "ground_truth": "1"}, {"kind": "skip", "ground_truth": "2"}]
    messages = [CHAT, CHAT + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]]
    _, parts = Reward(None, reasoning=False, functions=[fn])(["p0", "p1"], ["r0", "r1"], ["1", "2"], messages,
                                                             rows=rows)
    assert fn.kind == "trl" and parts["custom"].tolist() == [2.0, 0.0]  # TRL's None: the function does not apply
    assert calls[-1] == dict(prompts=messages, completions=[[{"role": "assistant", "content": "r0"}],
                                                            [{"role": "assistant", "content": "r1"}]],
                             kind=["a", "skip"], ground_truth=["1", "2"])
    Reward(None, reasoning=False, functions=[fn])(["p0", "p1"], ["r0", "r1"], ["1", "2"], rows=rows)
    assert calls[-1] == dict(prompts=["p0", "p1"], completions=["r0", "r1"], kind=["a", "skip"],
                             ground_truth=["1", "2"])  # plain-text rows: strings
    named, _ = load(tmp_path, "trl_named")
    assert (named.kind, named.columns) == ("trl", ["ground_truth"])
    assert named(["p", "p"], ["1", "2"], [None, None], rows=[{"ground_truth": "1", "other": 5}] * 2).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"fns\.py:trl_state: requires trainer_state, which this trainer does not "
                                         r"pass"):
        load(tmp_path, "trl_state")


def test_openrlhf_signature_queries_prompts_labels_and_its_dict(tmp_path):
    fn, calls = load(tmp_path, "openrlhf_fn")
    fn.label_key = "label"
    rows = [{"label": 12}, {"label": "ab"}]
    total, parts = Reward(None, reasoning=False, functions=[fn])(["P0", "P1"], ["r", "rr"], ["12", "ab"], rows=rows)
    assert fn.kind == "openrlhf" and calls == [dict(queries=["P0r", "P1rr"], prompts=["P0", "P1"], labels=[12, "ab"])]
    assert parts["custom"].tolist() == [3.0, 4.0] and total.tolist() == [3.0, 4.0]
    assert parts["custom/scores"].tolist() == [1.0, 1.0] and parts["custom/label_len"].tolist() == [2.0, 2.0]
    assert "custom/scalar" not in parts  # not one number per sample
    tensor, _ = load(tmp_path, "openrlhf_tensor")
    assert tensor(["a", "b"], ["c", "d"], [None, None]).tolist() == [1.0, 1.0]


def test_check_labels_binds_the_functions_to_the_datas_label_column(tmp_path, tokenizer):
    rows = kit.verl_rows("train")[:3]
    path = write_rows(tmp_path / "verl.parquet", rows, "parquet")
    table = read_table(path)
    assert (table.unit, table.where(0), [n for n, _ in table.records]) == ("row", f"{path}: row 0", [0, 1, 2])
    ds = RLAIFDataset(path, tokenizer)
    fn, calls = load(tmp_path, "verl_fn")
    check_labels(ds, [fn], 0.0)
    assert fn.label_key == "reward_model.ground_truth"
    items = ds.samples
    Reward(None, reasoning=False, functions=[fn])([s["prompt"] for s in items], ["x"] * 3, ds.answers, ds.messages,
                                                  rows=[s["row"] for s in items])
    assert [(c["data_source"], c["ground_truth"], c["extra_info"]) for c in calls] == \
        [(r["data_source"], r["reward_model"]["ground_truth"], r["extra_info"]) for r in rows]


def test_unrecognised_signatures_and_calling_errors_name_file_function_and_sample(tmp_path):
    with pytest.raises(ValueError) as err:
        load(tmp_path, "unknown")
    message = str(err.value)
    assert re.search(r"--reward_fn \S+fns\.py:unknown: unrecognised signature unknown\(texts, scores\)", message)
    for accepted in ["compute_score(data_source, solution_str, ground_truth, extra_info=None)",
                     "reward_func(prompts, completions, **kwargs)", "reward_func(queries, prompts, labels)",
                     "function(prompts, responses, answers)"]:
        assert accepted in message
    for name in ("verl_raises", "trl_raises"):
        fn, _ = load(tmp_path, name)
        with pytest.raises(RuntimeError, match=re.escape(f"{fn.where} raised KeyError: 'bad sample' (sample 1: "
                                                         f"response 'a bad one')")):
            fn(["p", "p"], ["ok", "a bad one"], [None, None])
    fn, _ = load(tmp_path, "verl_no_score")
    with pytest.raises(ValueError, match=r"verl_no_score returned a dict without 'score' for sample 0"):
        fn(["p"], ["ok"], ["1"])
    fn, _ = load(tmp_path, "verl_nan")
    with pytest.raises(NonFiniteRolloutError, match=r"verl_nan returned nan for sample 0"):
        fn(["p"], ["ok"], ["1"])


# ----------------------------------------------------------------------------- routing
def test_data_source_routing_one_part_a_default_and_its_errors(tmp_path):
    verl, _ = load(tmp_path, "verl_fn", source="openai/gsm8k")
    trl, _ = load(tmp_path, "trl_fn")
    assert (verl.source, verl.name, trl.source) == ("openai/gsm8k", "verl_fn", None)
    rows = [{"data_source": "openai/gsm8k", "kind": "a", "ground_truth": "1"},
            {"data_source": "other", "kind": "b", "ground_truth": "2"},
            {"data_source": "openai/gsm8k", "kind": "c", "ground_truth": "3"}]
    total, parts = Reward(None, reasoning=False, functions=[verl, trl])(["p"] * 3, ["1", "22", "333"],
                                                                        ["1", "2", "3"], rows=rows)
    assert set(parts) == {"custom", "custom/acc", "custom/flag"}
    assert parts["custom"].tolist() == [2.0, 2.0, 4.0] and total.tolist() == [2.0, 2.0, 4.0]
    assert parts["custom/acc"].tolist() == [1.0, 0.0, 1.0]  # the default's row has none: 0
    path = functions_file(tmp_path, SIGNATURES)
    errors = [([f"a={path}:verl_fn", f"a={path}:verl_gsm8k"], r"a=\S+:verl_gsm8k: data_source 'a' is routed twice"),
              ([f"a={path}:verl_fn", f"{path}:trl_fn", f"{path}:verl_gsm8k"],
               r"2 functions without a data_source beside routed ones"),
              ([f"{path}:verl_fn", f"{tmp_path / 'fns.py'}:verl_fn"], r"its part custom_verl_fn would overwrite")]
    for specs, message in errors:
        with pytest.raises(ValueError, match=message):
            reward_parts([RewardFunction(spec) for spec in specs])


# ----------------------------------------------------------------------------- start-up errors, before any model
VERL_FN = "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 0.0\n"
TRL_FN = "def reward(prompts, completions, ground_truth, **kwargs):\n    return [0.0] * len(prompts)\n"
TRL_COLUMN = "def reward(prompts, completions, difficulty, **kwargs):\n    return [0.0] * len(prompts)\n"
OPENRLHF_FN = "def reward_func(queries, prompts, labels):\n    return [0.0] * len(queries)\n"
PROMPTS = [{"prompt": f"{i} plus {i} is"} for i in range(4)]
# case: (data file, its rows, reward function (spec prefix, code, name) or None, more flags, the error)
BAD_STARTS = {
    "--prompt_key in no row": (
        "data.jsonl", PROMPTS, None, ["--prompt_key", "question"],
        r"data\.jsonl:1: --prompt_key 'question' is in no row of the file \(its columns: prompt\)"),
    "--label_key in no row": (
        "data.parquet", PROMPTS, None, ["--label_key", "gold"],
        r"data\.parquet: row 0: --label_key 'gold' is in no row"),
    "a row without the prompt column": (
        "data.jsonl", PROMPTS + [{"question": "x"}], None, ["--prompt_key", "prompt"],
        r"data\.jsonl:5: missing 'prompt' \(--prompt_key\)"),
    "integers as prompts in parquet": (
        "data.parquet", [{"prompt": i} for i in range(4)], None, [],
        r"data\.parquet: row 0: 'prompt' must be a string \(a plain prompt\) or a list of chat messages, got int"),
    "--correctness_reward and a row without a label": (
        "data.jsonl", [dict(p, answer="2") for p in PROMPTS[:3]] + PROMPTS[3:], None, ["--correctness_reward", "1"],
        r"data\.jsonl:4: no ground truth `answer` in this row, but --correctness_reward 1\.0 compares with it"),
    "a verl function and a row without reward_model.ground_truth": (
        "data.parquet",
        [dict(p, reward_model={"ground_truth": None if i == 2 else "2"}) for i, p in enumerate(PROMPTS)],
        ("", VERL_FN, "compute_score"), [],
        r"data\.parquet: row 2: no ground truth `reward_model\.ground_truth` in this row, but --reward_fn "
        r"\S+fn\.py:compute_score \(verl's ground_truth\) compares with it"),
    "an OpenRLHF function and a row without its label": (
        "data.jsonl", [dict(p, label="2") for p in PROMPTS[:1]] + PROMPTS[1:], ("", OPENRLHF_FN, "reward_func"),
        ["--label_key", "label"],
        r"data\.jsonl:2: no ground truth `label` in this row, but --reward_fn \S+fn\.py:reward_func \(OpenRLHF's "
        r"labels\)"),
    "an OpenRLHF function and no label at all": (
        "data.jsonl", PROMPTS, ("", OPENRLHF_FN, "reward_func"), [],
        r"--reward_fn \S+fn\.py:reward_func \(OpenRLHF's labels\): \S+data\.jsonl has no `answer` field \(nor "
        r"ground_truth, solution, reward_model\.ground_truth; --label_key names another column\)"),
    "a TRL function naming the label column and a row without it": (
        "data.jsonl", [dict(p, ground_truth="2") for p in PROMPTS[:2]] + PROMPTS[2:], ("", TRL_FN, "reward"), [],
        r"data\.jsonl:3: no ground truth `ground_truth` in this row, but --reward_fn \S+fn\.py:reward \(a TRL "
        r"function naming the column\)"),
    "a TRL function naming a column no row has": (
        "data.jsonl", PROMPTS, ("", TRL_COLUMN, "reward"), [],
        r"data\.jsonl:1: no column 'difficulty' in any row, but --reward_fn \S+fn\.py:reward names it"),
    "a data_source no routed function takes": (
        "data", [dict(p, data_source="gsm8k" if i < 3 else "math", reward_model={"ground_truth": "2"})
                 for i, p in enumerate(PROMPTS)], ("gsm8k=", VERL_FN, "compute_score"), [],
        r"data: row 3: data_source 'math' has no reward function \(routed: 'gsm8k'; add --reward_fn "
        r"math=FILE\.py:FUNCTION"),
}


@pytest.mark.parametrize("case", list(BAD_STARTS))
def test_bad_input_stops_at_start_up_naming_file_row_and_key(tiny_kit, tmp_path, capsys, case):
    name, rows, function, flags, message = BAD_STARTS[case]
    path = write_rows(tmp_path / name, rows, name.rpartition(".")[2] if "." in name else "save_to_disk")
    extra = ["--data_path", path, "--eval_data_path", "none", *flags]
    if function:
        prefix, code, fn_name = function
        extra += ["--reward_fn", f"{prefix}{functions_file(tmp_path, code, 'fn.py')}:{fn_name}"]
    with pytest.raises(ValueError, match=message):
        train_ppo.main(train_ppo.parse_args(tiny_run_args(tiny_kit, tmp_path / "out", *extra)))
    assert "actor: " not in capsys.readouterr().out  # build_models logs the actor it built: none was


# ----------------------------------------------------------------------------- the README's commands, end to end
def test_readme_commands_parse_and_name_the_files_the_kit_writes():
    commands = kit.readme_commands()
    data = {cmd[cmd.index("--data_path") + 1]: cmd for cmd in commands}
    assert set(data) == {"gsm8k/train.parquet", "gsm8k_math", "math.jsonl", "prompts.jsonl"}
    reward_files = set()
    for cmd in commands:
        args = train_ppo.parse_args(cmd)
        assert args.from_weight == "Qwen2.5-0.5B-Instruct" and args.reward_model_path == "none"
        reward_files |= {spec.rpartition(":")[0].rpartition("=")[2] for spec in args.reward_fn}
    assert reward_files == {"gsm8k_reward.py", "math_reward.py", "trl_rewards.py", "reward_func.py"}
    assert train_ppo.parse_args(data["prompts.jsonl"]).prompt_key == "context_messages"


def run_readme_command(tiny_kit, tmp_path, monkeypatch, data_path, files):
    """Writes `files` ({name: text}) in tmp_path, runs the README command for data_path there on the tiny
    actor for 2 steps of 4 prompts (every sample logged), and returns (samples, metrics)."""
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = kit.readme_command(data_path) + [
        "--from_weight", tiny_kit["actor"], "--save_dir", str(tmp_path / "out"), "--batch_size", "4",
        "--mini_batch_size", "2", "--max_gen_len", "8", "--max_seq_len", "64", "--max_steps", "2",
        "--eval_limit", "4", "--log_samples", "4", "--device", "cpu", "--seed", "1", "--check_tokenizer", "0",
        "--save_interval", "10"]
    train_ppo.main(train_ppo.parse_args(argv))
    lines = lambda name: [json.loads(line) for line in open(tmp_path / "out" / name)]  # noqa: E731
    samples, metrics = lines("samples.jsonl"), lines("metrics.jsonl")
    assert len(samples) == 8
    for sample in samples:  # the total is the sum of the additive parts: diagnostics (with a slash) are not added
        additive = [v for k, v in sample.items() if k.startswith("reward_") and "/" not in k]
        assert sum(additive) == pytest.approx(sample["reward"], abs=1e-5)
    return samples, metrics


def test_readme_verl_command_on_verls_parquet(tiny_kit, tmp_path, monkeypatch):
    kit.write_verl_parquet(tmp_path)
    samples, metrics = run_readme_command(tiny_kit, tmp_path, monkeypatch, "gsm8k/train.parquet",
                                          {"gsm8k_reward.py": kit.GSM8K_REWARD})
    rows = {kit.question_of(r["prompt"][0]["content"]): r for r in pq.read_table(tmp_path / "gsm8k" / "train.parquet")
            .to_pylist()}
    for sample in samples:
        row = rows[kit.question_of(sample["prompt"])]
        assert f"<|im_start|>user\n{row['prompt'][0]['content']}<|im_end|>" in sample["prompt"]
        score, diagnostics = kit.expected_gsm8k(sample["response"], row)
        assert sample["reward_custom"] == pytest.approx(score)
        assert {k: sample[f"reward_custom/{k}"] for k in diagnostics} == pytest.approx(diagnostics)
        assert "reward_custom/pred" not in sample  # not a number: not logged
    assert all("reward_custom/acc" in m for m in metrics if "reward" in m)
    assert [m["step"] for m in metrics if "eval_reward" in m] == [0, 2]  # the held-out parquet, rows and all


def test_readme_trl_command_on_a_messages_jsonl(tiny_kit, tmp_path, monkeypatch):
    kit.write_trl_jsonl(tmp_path)
    samples, _ = run_readme_command(tiny_kit, tmp_path, monkeypatch, "math.jsonl",
                                    {"trl_rewards.py": kit.TRL_REWARDS})
    rows = {kit.question_of(r["messages"][1]["content"]): r for r in map(json.loads, open(tmp_path / "math.jsonl"))}
    for sample in samples:
        row = rows[kit.question_of(sample["prompt"])]
        assert sample["prompt"].startswith("<|im_start|>system\nAnswer with a number.<|im_end|>")
        assert "The answer is" not in sample["prompt"]  # the completion of a messages row is dropped
        assert sample["reward_custom"] == pytest.approx(kit.expected_trl(sample["response"], row))


def test_readme_openrlhf_command_with_its_input_and_label_keys(tiny_kit, tmp_path, monkeypatch):
    kit.write_openrlhf_jsonl(tmp_path)
    samples, _ = run_readme_command(tiny_kit, tmp_path, monkeypatch, "prompts.jsonl",
                                    {"reward_func.py": kit.OPENRLHF_REWARD})
    rows = {kit.question_of(r["context_messages"][0]["content"]): r
            for r in map(json.loads, open(tmp_path / "prompts.jsonl"))}
    for sample in samples:
        row = rows[kit.question_of(sample["prompt"])]
        reward, diagnostics = kit.expected_openrlhf(sample["prompt"], sample["response"], row)
        assert sample["reward_custom"] == pytest.approx(reward)
        assert {k: sample[f"reward_custom/{k}"] for k in diagnostics} == pytest.approx(diagnostics)


def test_readme_routed_command_on_a_save_to_disk_folder(tiny_kit, tmp_path, monkeypatch):
    import datasets
    kit.write_verl_concatenated(tmp_path)
    samples, _ = run_readme_command(tiny_kit, tmp_path, monkeypatch, "gsm8k_math",
                                    {"gsm8k_reward.py": kit.GSM8K_REWARD, "math_reward.py": kit.MATH_REWARD})
    saved = datasets.load_from_disk(str(tmp_path / "gsm8k_math"))
    rows = {kit.question_of(r["prompt"][0]["content"]): r for r in saved}
    sources = set()
    for sample in samples:
        row = rows[kit.question_of(sample["prompt"])]
        sources.add(row["data_source"])
        if row["data_source"] == "openai/gsm8k":
            score, diagnostics = kit.expected_gsm8k(sample["response"], row)
        else:  # the plain --reward_fn: the default for every other source; no diagnostics of its own
            score, diagnostics = kit.expected_math(sample["response"], row), {"acc": 0.0, "chars": 0.0}
        assert sample["reward_custom"] == pytest.approx(score)
        assert {k: sample[f"reward_custom/{k}"] for k in diagnostics} == pytest.approx(diagnostics)
    assert sources == {"openai/gsm8k", "DigitalLearningGmbH/MATH-lighteval"}, sources
