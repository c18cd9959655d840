"""Prompt files as rows: jsonl, json, parquet or a folder written by `datasets`' save_to_disk, read by the
`datasets` library (the reader verl, TRL and OpenRLHF use), in memory, offline.

`read_table(path)` returns a `Table`: the file's rows as plain Python dicts, each with the number a message
names it by (its line in a jsonl file, counted from 1 as editors do; its index in any other format, from 0
as `dataset[i]` counts). Which column is the prompt and which the ground truth is decided by lm_dataset.

jsonl files keep their precise errors: when `datasets` cannot read one (a line that is not JSON, not an
object, not UTF-8, or columns whose types pyarrow cannot unify), or reads it into something other than one
row per non-blank line, or falls back to its catch-all `Json` column type (which decodes a string such as
"12" as the number 12), the lines are read here with Python's json, and a bad line is named by its number.
"""
import contextlib
import json
import math
import os
import tempfile
from trainer_utils import InputError, MissingFileError

PROMPT_KEYS = ("conversations", "messages", "prompt")  # --prompt_key's auto-detection, in this order
LABEL_KEYS = ("answer", "ground_truth", "solution", "reward_model.ground_truth")  # --label_key's
MISSING = object()


class Table:
    """The rows of one file: `records` [(number, dict)], `skipped` [(number, reason)] (skip_bad_lines), `unit`
    ("line": jsonl, numbered from 1; "row": every other format, from 0)."""

    def __init__(self, path, unit, records, skipped=()):
        self.path, self.unit, self.records, self.skipped = path, unit, list(records), list(skipped)

    def where(self, number):
        """How a message names one row: `file:line` for jsonl, `file: row i` otherwise."""
        return f"{self.path}:{number}" if self.unit == "line" else f"{self.path}: row {number}"

    def columns(self):
        """Every column some row has a value in, in first-seen order."""
        seen = {}
        for _, record in self.records:
            seen.update((key, None) for key, value in record.items() if value is not None)
        return list(seen)


def read_table(path, skip_bad_lines=False):
    """The rows of `path`: a save_to_disk folder, a .parquet file, a .json file (an array of objects, or JSON
    lines) or, any other name, a jsonl file. skip_bad_lines: jsonl lines that are not JSON objects are
    recorded in `skipped` instead of stopping the run."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return Table(path, "row", enumerate(_read_folder(path)))
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: prompt file not found")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".parquet":
        return Table(path, "row", enumerate(_read_parquet(path)))
    if extension == ".json":
        rows = _read_json_array(path)
        if rows is not None:
            return Table(path, "row", enumerate(rows))
    return _read_jsonl(path, skip_bad_lines)


# ----------------------------------------------------------------------------- through `datasets`
@contextlib.contextmanager
def offline_and_quiet():
    """`datasets` with the hub switched off (no network call at run time, whatever the environment says),
    its progress bars and logs silenced; restored afterwards."""
    import datasets
    from datasets.utils import logging as datasets_logging
    flags = {name: getattr(datasets.config, name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
             if hasattr(datasets.config, name)}
    bars_off, verbosity = datasets.are_progress_bars_disabled(), datasets_logging.get_verbosity()
    for name in flags:
        setattr(datasets.config, name, True)
    datasets.disable_progress_bars()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # a parse failure is ours to report, by line
    try:
        yield datasets
    finally:
        for name, value in flags.items():
            setattr(datasets.config, name, value)
        if not bars_off:
            datasets.enable_progress_bars()
        datasets_logging.set_verbosity(verbosity)


def _built(reader, path):
    """A file read by Dataset.from_json / from_parquet into memory. Their builders write an Arrow copy under a
    cache folder: a temporary one, deleted at once, so nothing lands in the user's folders or caches."""
    with offline_and_quiet() as datasets, tempfile.TemporaryDirectory(prefix="ppo-data-") as cache:
        return getattr(datasets.Dataset, reader)(path, keep_in_memory=True, cache_dir=cache)


def has_catch_all_json(feature):
    """Whether a `datasets` feature (or any nested in it) is the `Json` type it falls back to for columns of
    mixed types: it decodes a string that reads as JSON ("12") into another type (12), so rows read that
    way are not what the file says."""
    if type(feature).__name__ == "Json":
        return True
    if isinstance(feature, dict):
        return any(has_catch_all_json(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(has_catch_all_json(f) for f in feature)
    inner = getattr(feature, "feature", None)
    return inner is not None and has_catch_all_json(inner)


def _read_folder(path):
    with offline_and_quiet() as datasets:
        try:
            data = datasets.load_from_disk(path, keep_in_memory=True)
        except FileNotFoundError as e:
            raise InputError(f"{path}: a folder, but not one written by datasets' save_to_disk ({e})") from None
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        raise InputError(f"{path}: a DatasetDict with splits {', '.join(splits)}; point the path at one split's "
                         f"folder, e.g. {os.path.join(path, splits[0])}")
    return data.to_list()


def _read_parquet(path):
    try:
        data = _built("from_parquet", path)
    except Exception as e:
        raise InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    return data.to_list()


def _read_json_array(path):
    """A .json file's rows when it holds an array of objects; None when it holds JSON lines (read as jsonl, so
    that a bad line is named by its number). An array `datasets` cannot read, or reads only through its
    catch-all Json type, is read with Python's json."""
    if not _head(path).startswith("["):
        return None
    try:
        data = _built("from_json", path)
        if not has_catch_all_json(data.features):
            return data.to_list()
    except Exception:
        pass
    try:
        with open(path, encoding="utf-8-sig") as f:
            records = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a JSON array of objects ({e})") from None
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{path}: row {i}: record must be a JSON object, got {type(record).__name__}")
    return records


def _head(path):
    with open(path, "rb") as f:
        return f.read(4096).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")


# ----------------------------------------------------------------------------- jsonl
def _read_jsonl(path, skip_bad_lines):
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    numbers, simple = [], True  # the non-blank lines; whether each looks like one JSON object
    for lineno, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            simple = False
            numbers.append(lineno)
            continue
        text = text.strip().removeprefix("\ufeff").strip() if lineno == 1 else text.strip()
        if text:
            numbers.append(lineno)
            simple = simple and text.startswith("{") and text.endswith("}")
    if not numbers:
        raise InputError(f"{path}: no prompts (the file is empty or has only blank lines)")
    if simple:
        try:
            data = _built("from_json", path)
        except Exception:
            data = None
        if data is not None and len(data) == len(numbers) and not has_catch_all_json(data.features):
            return Table(path, "line", zip(numbers, data.to_list()))
    return _read_jsonl_lines(path, lines, skip_bad_lines)


def _read_jsonl_lines(path, lines, skip_bad_lines):
    """Python's reading of a jsonl file, line by line: exact values, and a bad line named by its number."""
    records, skipped = [], []
    for lineno, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")  # per line, so that a bad byte is reported with its line number
        except UnicodeDecodeError as e:
            reason = f"not valid UTF-8 (byte {e.start})"
        else:
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # byte-order mark left by some editors
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                reason = f"invalid JSON: {e.msg} (column {e.colno})"  # e.msg may end with "at"
            else:
                if isinstance(record, dict):
                    records.append((lineno, record))
                    continue
                reason = f"record must be a JSON object, got {type(record).__name__}"
        if not skip_bad_lines:
            raise InputError(f"{path}:{lineno}: {reason}")
        skipped.append((lineno, reason))
    return Table(path, "line", records, skipped)


# ----------------------------------------------------------------------------- columns
def resolve(record, key):
    """The value at `key` in a row, or MISSING: a column name, or a dotted path into nested dicts
    (reward_model.ground_truth); a column whose own name has dots is found first. None counts as missing
    (`datasets` fills a column a row lacks with None)."""
    if record is None:
        return MISSING
    value = record.get(key, MISSING)
    if value is MISSING and "." in key:
        value = record
        for part in key.split("."):
            value = value.get(part, MISSING) if isinstance(value, dict) else MISSING
            if value is MISSING:
                break
    return MISSING if value is None else value


def detect_label_key(table, label_key=None):
    """--label_key, or the ground-truth column of the file's rows (`table`): verl's rows (a `reward_model` dict)
    take `reward_model.ground_truth`, whatever other columns they kept (a worked `solution` is not the answer
    verl's compute_score compares with); other rows the one of LABEL_KEYS they have. Two of those with different
    values in one row are an error naming them (which one is the answer is the user's call); None when no row
    has any."""
    if label_key:
        return label_key
    records = [record for _, record in table.records]
    verl = "reward_model.ground_truth"
    if any(isinstance(r.get("reward_model"), dict) and resolve(r, verl) is not MISSING for r in records):
        return verl
    present = [key for key in LABEL_KEYS if any(resolve(r, key) is not MISSING for r in records)]
    for number, record in table.records:
        values = {key: label_text(resolve(record, key)) for key in present if resolve(record, key) is not MISSING}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{key} = {value[:40]!r}" for key, value in values.items())
            raise InputError(f"{table.where(number)}: {len(values)} columns could be the ground truth and differ "
                             f"({shown}); name the one the reward compares with: --label_key "
                             f"{' or --label_key '.join(values)}")
    return present[0] if present else None


def label_text(value):
    """A ground truth as the string the accuracy and --correctness_reward compare with: strings as they are;
    numbers as their decimal text (an integral float, such as pyarrow makes of 12 in a column that also
    holds 0.5, or pandas of an int column with gaps, as the integer); anything else as JSON."""
    if value is MISSING or value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if math.isfinite(value) and value.is_integer() else repr(value)
    return json.dumps(value, ensure_ascii=False, default=str)
