"""Reward functions from files, as verl, TRL and OpenRLHF users write them (`--reward_fn`): recognised by their
parameters, called once per rollout (verl's per sample), routed by each row's data_source as verl routes them,
and checked against the data at start-up (check_labels). Used by reward.Reward."""
import inspect
import math
import numbers
import os

import torch

from dataset.formats import LABEL_KEYS, MISSING, resolve
from trainer_utils import InputError, MissingFileError


class NonFiniteRolloutError(ValueError):
    """A NaN or infinite reward or value in a rollout: the trainer gives that rollout no update."""


VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")
OPENRLHF_ARGS = ("queries", "prompts", "labels")
PLAIN_ARGS = ("prompts", "responses", "answers")
TRL_NOT_PASSED = ("completions_ids", "completion_ids", "trainer_state")  # TRL's own; this trainer has none
NEEDS_LABEL = {"verl": "verl's ground_truth", "openrlhf": "OpenRLHF's labels",
               "trl": "a TRL function naming the column"}
SIGNATURES = {
    "verl": "verl's compute_score(data_source, solution_str, ground_truth, extra_info=None), called per sample",
    "trl": "TRL's reward_func(prompts, completions, **kwargs), every other column passed by name",
    "openrlhf": "OpenRLHF's reward_func(queries, prompts, labels)",
    "plain": "function(prompts, responses, answers)",
}


def split_spec(spec):
    """(data_source or None, path, function) of `--reward_fn [SOURCE=]path/to/file.py:function`. A data_source
    may hold a slash (verl's `openai/gsm8k`); a spec whose file exists as written has none."""
    source, eq, rest = spec.partition("=")
    if not eq or not source or os.path.isfile(spec.rpartition(":")[0]):
        source, rest = None, spec
    path, sep, name = rest.rpartition(":")
    if not sep or not path or not name:
        raise InputError(f"--reward_fn {spec!r}: expected path/to/file.py:function, or SOURCE=path/to/file.py:function "
                         f"for the rows whose data_source is SOURCE")
    return source, path, name


def as_numbers(values):
    """A tensor, array or sequence as a flat list (a [B, 1] tensor as [B])."""
    if hasattr(values, "tolist") and hasattr(values, "shape"):  # torch and numpy
        values = values.reshape(-1).tolist() if len(values.shape) else [values.item()]
    return list(values)


def one_number(value):
    """A diagnostic value as a finite float, or None (not a number, or not finite: not logged for that sample)."""
    if hasattr(value, "item") and getattr(value, "shape", None) in ((), (1,)):  # a one-element tensor or array
        value = value.item()
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    return None


def per_sample_numbers(value, n):
    """`value` as n floats when it holds one number per sample (a tensor, array or list; a non-finite one is 0);
    else None (not logged)."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        return None
    try:
        values = as_numbers(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if len(values) != n or not all(isinstance(v, numbers.Real) for v in values):
        return None
    return [one_number(v) or 0.0 for v in values]


class RewardFunction:
    """`--reward_fn [SOURCE=]path/to/file.py:function`: a reward function from a file, in one of four signatures,
    recognised from its parameter names at load time (an unrecognised one is an error naming the file, the
    function and the signatures accepted):

    - verl: compute_score(data_source, solution_str, ground_truth, extra_info=None), called per sample by
      keyword with the row's `data_source` and `extra_info`, the response and the row's ground truth as the data
      holds it (`label_key`, see check_labels). It returns a number, or a dict whose `score` is the reward and
      whose other numeric entries are logged as diagnostics.
    - TRL: reward_func(prompts, completions, **kwargs), called once per batch with every other column of the
      data by name (`ground_truth=[...]`); as TRL does, for chat data prompts are the rows' messages and each
      completion is [{"role": "assistant", "content": response}], for plain-text data both are strings. A None
      in what it returns (TRL's "this function does not apply to this sample") counts 0. TRL's
      `completions_ids` and `trainer_state` are not passed: a function that requires them is refused.
    - OpenRLHF: reward_func(queries, prompts, labels), once per batch: queries are prompt + response texts,
      prompts the prompts as the policy saw them (template included), labels the rows' ground truths. It returns
      a tensor or list, or a dict whose `rewards` are the reward and whose other per-sample numeric entries
      (`scores`, and those inside `extra_logs`) are logged as diagnostics.
    - this project's: function(prompts, responses, answers), once per batch: the prompts as the policy saw them,
      the responses, and the rows' ground truths as strings (None where a row has none).

    Each returns one number per response. `score` gives (rewards [B], {diagnostic: [B]}); calling the object
    gives the rewards alone. Loading and calling errors name the file, the function and the sample.
    `source`: the data_source this function is routed to (None: not routed; see RoutedRewards)."""

    def __init__(self, spec):
        import importlib.util
        self.source, path, name = split_spec(spec)
        self.where = f"--reward_fn {spec}"
        if not os.path.isfile(path):
            raise MissingFileError(f"{self.where}: no such file")
        try:
            module_spec = importlib.util.spec_from_file_location(f"reward_fn_{abs(hash(path))}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise InputError(f"{self.where}: loading {path} failed ({type(e).__name__}: {e})") from e
        self.fn, self.name, self.path = getattr(module, name, None), name, path
        if not callable(self.fn):
            raise InputError(f"{self.where}: {path} defines no function {name!r}")
        self.kind, self.params, self.columns, self.takes_any = self._recognise()
        self.label_key = None  # the data's ground-truth column (a dotted path), set by check_labels

    def _recognise(self):
        """(kind, named parameters, the data columns a TRL function requires by name, whether it takes **kwargs)."""
        def refuse(shown):
            return InputError(f"{self.where}: unrecognised signature {self.name}{shown}; accepted: "
                              + "; ".join(SIGNATURES.values()))
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):
            raise refuse("(...)") from None
        params = signature.parameters
        named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        required = {n for n in named if params[n].default is params[n].empty}
        positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        by_keyword = not any(p.kind == p.POSITIONAL_ONLY for p in params.values())
        takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        if "solution_str" in named and required <= set(VERL_ARGS) and by_keyword:
            return "verl", named, [], takes_any
        if {"queries", "labels"} <= set(named) and required <= set(OPENRLHF_ARGS) and by_keyword:
            return "openrlhf", named, [], takes_any
        if "completions" in named and by_keyword:
            missing = sorted(required & set(TRL_NOT_PASSED))
            if missing:
                raise InputError(f"{self.where}: requires {', '.join(missing)}, which this trainer does not pass "
                                 f"(it passes prompts, completions and the data's columns); give them a default")
            columns = [n for n in named if n in required and n not in ("prompts", "completions")]
            return "trl", named, columns, takes_any
        if positional[:3] == list(PLAIN_ARGS) and required <= set(PLAIN_ARGS):
            return "plain", named, [], takes_any
        raise refuse(signature)

    def describe(self):
        return f"{self.name} from {self.path} ({self.kind}'s signature)"

    @property
    def needs_label(self):
        """Whether every row this function scores must carry a ground truth (checked at start-up)."""
        if self.kind == "verl":
            return "ground_truth" in self.params
        if self.kind == "openrlhf":
            return "labels" in self.params
        if self.kind == "trl" and self.label_key:
            return self.label_key.split(".")[0] in self.params
        return False

    def label(self, row, answer):
        """A row's ground truth as the data holds it (a dotted `label_key` into the row; not bound: the first
        of LABEL_KEYS the row has), else the string answer, else None."""
        keys = [self.label_key] if self.label_key else list(LABEL_KEYS)
        for key in keys:
            value = resolve(row, key)
            if value is not MISSING:
                return value
        return answer or None

    def __call__(self, prompts, responses, answers, messages=None, rows=None):
        return self.score(prompts, responses, answers, messages, rows)[0]

    def score(self, prompts, responses, answers, messages=None, rows=None, samples=None, completions=None):
        """(rewards [B] float32, {diagnostic name: [B]}) of B responses. messages: each row's chat (None for
        plain text); rows: each row's other columns (None: none known); samples: the batch index of each, for
        messages (default 0..B-1); completions: with tools, each response as its turns' messages (assistant
        turns and tool results), TRL's `completions` then. A diagnostic a sample's result lacks is 0 for that
        sample."""
        B = len(responses)
        prompts, responses, answers = list(prompts), list(responses), list(answers)
        messages = list(messages) if messages is not None else [None] * B
        rows = list(rows) if rows is not None else [None] * B
        samples = list(samples) if samples is not None else list(range(B))
        if self.kind == "verl":
            values, diagnostics = [], {}
            for i in range(B):
                try:
                    value = self.fn(**self._verl_kwargs(responses[i], answers[i], rows[i]))
                except Exception as e:
                    raise RuntimeError(f"{self.where} raised {type(e).__name__}: {e} "
                                       f"(sample {samples[i]}: response {responses[i][:80]!r})") from e
                if isinstance(value, dict):
                    if "score" not in value:
                        raise InputError(f"{self.where} returned a dict without 'score' for "
                                         f"{self._sample(samples[i], responses[i])}: keys {sorted(value)}")
                    for key, entry in value.items():
                        number = one_number(entry) if key != "score" else None
                        if number is not None:
                            diagnostics.setdefault(str(key), [0.0] * B)[i] = number
                    value = value["score"]
                values.append(value)
        else:
            try:
                values = self._call_batch(prompts, responses, answers, messages, rows, completions)
            except Exception as e:
                failing = self._failing_sample(prompts, responses, answers, messages, rows, samples, completions)
                raise RuntimeError(f"{self.where} raised {type(e).__name__}: {e} ({failing})") from e
            values, diagnostics = self._split_result(values, B)
        return self._to_tensor(values, responses, samples), {k: torch.tensor(v, dtype=torch.float32)
                                                              for k, v in diagnostics.items()}

    def _verl_kwargs(self, response, answer, row):
        given = dict(data_source=None if row is None else row.get("data_source"), solution_str=response,
                     ground_truth=self.label(row, answer),
                     extra_info=dict((row or {}).get("extra_info") or {}))  # always a dict, as verl passes it
        return {k: v for k, v in given.items() if k in self.params or self.takes_any}

    def _call_batch(self, prompts, responses, answers, messages, rows, completions=None):
        if self.kind == "plain":
            return self.fn(prompts, responses, answers)
        if self.kind == "openrlhf":
            labels = [self.label(row, answer) for row, answer in zip(rows, answers)]
            return self.fn(queries=[p + r for p, r in zip(prompts, responses)], prompts=prompts, labels=labels)
        chat = [m is not None for m in messages]  # TRL: conversational rows get messages, plain rows strings
        kwargs = dict(prompts=[m if c else p for m, c, p in zip(messages, chat, prompts)],
                      completions=completions or [[{"role": "assistant", "content": r}] if c else r
                                                  for r, c in zip(responses, chat)])
        columns = dict.fromkeys(k for row in rows if row for k in row)
        for column in columns:
            if column not in kwargs and (self.takes_any or column in self.params):
                kwargs[column] = [None if row is None else row.get(column) for row in rows]
        return self.fn(**{k: v for k, v in kwargs.items() if k in self.params or self.takes_any})

    def _split_result(self, result, B):
        """(rewards, {diagnostic: [B]}) of a batch function's result: OpenRLHF's dict gives its `rewards` and
        logs its other per-sample numbers (`scores`, and `extra_logs`' entries)."""
        if not (self.kind == "openrlhf" and isinstance(result, dict)):
            return result, {}
        if "rewards" not in result:
            raise InputError(f"{self.where} returned a dict without 'rewards': keys {sorted(result)}")
        entries = {k: v for k, v in result.items() if k not in ("rewards", "extra_logs")}
        if isinstance(result.get("extra_logs"), dict):
            entries.update(result["extra_logs"])
        diagnostics = {str(k): per_sample_numbers(v, B) for k, v in entries.items()}
        return result["rewards"], {k: v for k, v in diagnostics.items() if v is not None}

    def _to_tensor(self, values, responses, samples):
        try:
            values = as_numbers(values)
        except TypeError:
            raise InputError(f"{self.where} returned {values!r}: expected one number per response") from None
        if len(values) != len(responses):
            raise InputError(f"{self.where} returned {len(values)} values for {len(responses)} responses")
        scores = []
        for i, value in enumerate(values):
            if value is None and self.kind == "trl":  # TRL: the function does not apply to this sample
                value = 0.0
            try:
                scores.append(float(value))
            except (TypeError, ValueError):
                raise InputError(f"{self.where} returned {value!r} for {self._sample(samples[i], responses[i])}: "
                                 f"expected a number") from None
            if not math.isfinite(scores[-1]):
                raise NonFiniteRolloutError(f"{self.where} returned {value} for "
                                            f"{self._sample(samples[i], responses[i])}")
        return torch.tensor(scores, dtype=torch.float32)

    @staticmethod
    def _sample(i, response):
        return f"sample {i} (response {response[:80]!r})"

    def _failing_sample(self, prompts, responses, answers, messages, rows, samples, completions=None):
        for i in range(len(responses)):  # one at a time, to name the sample
            try:
                self._call_batch(prompts[i:i + 1], responses[i:i + 1], answers[i:i + 1], messages[i:i + 1],
                                 rows[i:i + 1], completions and completions[i:i + 1])
            except Exception:
                return f"sample {samples[i]}: response {responses[i][:80]!r}"
        return f"on the batch of {len(responses)} responses; each alone passes"


class RoutedRewards:
    """verl's data_source routing: `--reward_fn SOURCE=file.py:function` scores the rows whose `data_source` is
    SOURCE; one plain `--reward_fn file.py:function` beside them scores every other row (the default). Together
    they are one reward part. A row no function takes is an error (check_labels stops the run at start-up)."""

    def __init__(self, routed, default=None):
        self.routes, self.default = {}, default
        for fn in routed:
            if fn.source in self.routes:
                raise InputError(f"{fn.where}: data_source {fn.source!r} is routed twice "
                                 f"({self.routes[fn.source].where})")
            self.routes[fn.source] = fn
        self.functions = list(self.routes.values()) + ([default] if default else [])

    def describe(self):
        routes = [f"data_source {source}: {fn.describe()}" for source, fn in self.routes.items()]
        return "; ".join(routes + ([f"other data sources: {self.default.describe()}"] if self.default else []))

    def function_for(self, row):
        source = None if row is None else row.get("data_source")
        return self.routes.get(None if source is None else str(source), self.default)

    def unrouted(self, source):
        return (f"data_source {source!r} has no reward function (routed: {', '.join(map(repr, self.routes))}; "
                f"add --reward_fn {source}=FILE.py:FUNCTION, or a plain --reward_fn FILE.py:FUNCTION for "
                f"every other data_source)")

    def score(self, prompts, responses, answers, messages=None, rows=None, samples=None, completions=None):
        B = len(responses)
        messages = list(messages) if messages is not None else [None] * B
        rows = list(rows) if rows is not None else [None] * B
        samples = list(samples) if samples is not None else list(range(B))
        chosen = {}
        for i, row in enumerate(rows):
            fn = self.function_for(row)
            if fn is None:
                source = None if row is None else row.get("data_source")
                raise InputError(f"sample {samples[i]}: {self.unrouted(source)}")
            chosen.setdefault(fn, []).append(i)
        scores, diagnostics = torch.zeros(B), {}
        for fn, index in chosen.items():
            pick = lambda seq: [seq[i] for i in index]  # noqa: E731
            part, extra = fn.score(pick(prompts), pick(responses), pick(answers), pick(messages), pick(rows),
                                   pick(samples), completions and pick(completions))
            scores[index] = part
            for key, values in extra.items():
                diagnostics.setdefault(key, torch.zeros(B))[index] = values
        return scores, diagnostics


def reward_parts(functions):
    """[(part name, scorer)] of the --reward_fn functions: unrouted ones are `custom` (several: `custom_<function>`);
    with data_source routing, the routed functions and the one plain function beside them (the default) are the
    part `custom`. Raises ValueError on routing that cannot be meant (two defaults, one source twice) or two
    functions whose parts would share a name."""
    functions = list(functions)
    routed = [fn for fn in functions if fn.source is not None]
    plain = [fn for fn in functions if fn.source is None]
    if routed:
        if len(plain) > 1:
            raise InputError(f"--reward_fn: {len(plain)} functions without a data_source beside routed ones "
                             f"({', '.join(fn.where for fn in plain)}); at most one, the default for the other "
                             f"data sources")
        return [("custom", RoutedRewards(routed, plain[0] if plain else None))]
    if len(plain) == 1:
        return [("custom", plain[0])]
    names = {}
    for fn in plain:
        if fn.name in names:
            raise InputError(f"{fn.where}: its part custom_{fn.name} would overwrite that of {names[fn.name].where}; "
                             f"give the functions different names")
        names[fn.name] = fn
    return [(f"custom_{fn.name}", fn) for fn in plain]


def check_labels(dataset, functions, correctness):
    """Before any model is built, what the rewards need from the data (errors name the file, the row and the
    key). Binds each function to the data's ground-truth column (`label_key`). Checks: the --reward_fn routing
    (reward_parts), that every row's data_source has a function when functions are routed, and that every
    row carries a ground truth where a reward compares with one: --correctness_reward, a verl function
    (ground_truth), an OpenRLHF one (labels), a TRL one that names the label column; and that the columns a
    TRL function requires by name are in the data."""
    functions = list(functions)
    parts = reward_parts(functions)
    n = len(dataset.answers)
    rows = getattr(dataset, "rows", None) or [None] * n
    wheres = getattr(dataset, "wheres", None) or [f"{dataset.path}: row {i}" for i in range(n)]
    label_key = getattr(dataset, "label_key", "answer" if any(dataset.answers) else None)
    for fn in functions:
        fn.label_key = label_key
    columns = {k for row in rows if row for k, v in row.items() if v is not None}

    def need_labels(who, index):
        if label_key is None or not any(dataset.answers[i] for i in index):
            raise InputError(f"{who}: {dataset.path} has no `{label_key or 'answer'}` field"
                             + ("" if label_key else f" (nor {', '.join(LABEL_KEYS[1:])}; --label_key names "
                                                     f"another column)"))
        for i in index:
            if not dataset.answers[i]:
                raise InputError(f"{wheres[i]}: no ground truth `{label_key}` in this row, but {who} compares "
                                 f"with it")

    if correctness:
        need_labels(f"--correctness_reward {correctness}", range(n))
    for _, scorer in parts:
        index_of = {fn: [] for fn in getattr(scorer, "functions", [scorer])}
        for i, row in enumerate(rows):
            fn = scorer.function_for(row) if isinstance(scorer, RoutedRewards) else scorer
            if fn is None:
                raise InputError(f"{wheres[i]}: {scorer.unrouted(None if row is None else row.get('data_source'))}")
            index_of[fn].append(i)
        for fn, index in index_of.items():
            missing = [c for c in fn.columns if c not in columns]
            if missing and index:
                raise InputError(f"{wheres[0]}: no column {missing[0]!r} in any row, but {fn.where} names it "
                                 f"(TRL passes each column of the data by name)")
            if fn.needs_label and index:
                need_labels(f"{fn.where} ({NEEDS_LABEL[fn.kind]})", index)
