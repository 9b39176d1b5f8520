"""Dataset files -> records: the file formats read through `datasets`, the row formats, field mapping.

    records = read_records("train.parquet", "auto", fields={"prompt": "question", "answer": "solution"})

Files (by name; read with the `datasets` library, nothing cached on disk after reading):

| path                                 | read as                                   | row named in errors |
|--------------------------------------|-------------------------------------------|---------------------|
| `*.jsonl` (also `.jsonl.gz` ...)     | JSON lines                                | `train.jsonl:LINE`  |
| `*.json`                             | a JSON array of objects (or JSON lines)   | `train.json:row N`  |
| `*.parquet`, `*.csv`                 | columns                                   | `train.csv:row N`   |
| a folder                             | `Dataset.save_to_disk` output (a DatasetDict: its `train` split) | `NAME:row N` |

Rows (`dataset.format`; `auto`, the default, tells the format from the column names in the order
of this table). A "text or messages" field is a string or a list of chat messages
(`[{"role": "user", "content": "..."}, ...]`, TRL's conversational format):

| format      | columns                                                      | records         |
|-------------|--------------------------------------------------------------|-----------------|
| pairs       | `prompt` (or `query`), `chosen`, `rejected`: text or messages; with message lists the prompt may be left out (implicit: the turns both share) | PairRecord |
| stepwise    | `prompt`, `completions`: [step, ...], `labels`: [bool or -1..1, ...] (TRL's PRM rows) | StepRecord |
| ranked      | `prompt`, `outputs`: [best, ..., worst]                      | every (better, worse) PairRecord |
| instruction | `instruction`, `input` (optional), `output`, `history` ([[q, a], ...]) | SFTRecord (a conversation) |
| messages    | `messages`: a conversation ending with the assistant turn learned | SFTRecord |
| completion  | `prompt` (or `query`), `completion`: text or messages        | SFTRecord       |
| pair_list   | `prompt`, `output`: [chosen, rejected]                       | PairRecord      |
| prompts     | `prompt` (or `query`): text or messages, `answer` (optional) | PromptRecord    |

`dataset.fields` maps these names to a dataset's own columns ({"prompt": "question"}) before the
format is told. Every error names the file and the row; a file `datasets` cannot read is read
once more line by line to name the first bad line (invalid JSON, or a column whose type changes).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhf_contract.config import DATASET_FORMATS, DatasetFields

from rlhf_trainer.errors import ConfigError, DataError
from rlhf_trainer.records import Conversation, PairRecord, Prompt, PromptRecord, Record, SFTRecord, StepRecord

# Detection order of `auto`: the first format whose key columns are all present wins.
DETECTION = (
    ("pairs", ("chosen", "rejected")),
    ("stepwise", ("completions", "labels")),
    ("ranked", ("outputs",)),
    ("instruction", ("instruction",)),
    ("messages", ("messages",)),
    ("completion", ("completion",)),
    ("pair_list", ("output",)),
    ("prompts", ("prompt",)),
    ("prompts", ("query",)),
)
# Names `dataset.fields` may map (the columns the row formats read): rlhf_contract.config.DatasetFields.
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(DatasetFields))
PROMPT_ALIASES = ("prompt", "query")  # `query` is read when a row has no `prompt`
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


# ---- reading files ------------------------------------------------------------------------------


def builder_of(path: Path) -> str:
    """The `datasets` builder for a file name (`train.jsonl.gz` -> json); DataError if unknown."""
    suffixes = [s for s in path.suffixes if s not in COMPRESSIONS]
    if suffixes and suffixes[-1] in BUILDERS:
        return BUILDERS[suffixes[-1]]
    raise DataError(f"{path}: unknown dataset file type (use {', '.join(BUILDERS)} or a save_to_disk folder)")


def _is_json_lines(path: Path) -> bool:
    return ".jsonl" in path.suffixes


def _json_kind(value: Any) -> str:
    """A JSON value's type as a column must keep it ('number' covers ints and floats)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        inner = {_json_kind(v) for v in value if v is not None}
        return f"a list of {'/'.join(sorted(k.split(' ', 1)[1] for k in inner))}" if inner else "a list"
    return "an object"


def diagnose_rows(rows: Sequence[tuple[str, Any]]) -> DataError | None:
    """The first row that breaks a column file: not an object, or a field whose type changes."""
    first: dict[str, tuple[str, str]] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            return DataError(f"{where}: expected a JSON object, got {json.dumps(row)[:60]}")
        for key, value in row.items():
            if value is None:
                continue
            kind = _json_kind(value)
            seen = first.setdefault(key, (kind, where))
            if seen[0] != kind and not (seen[0].startswith("a list") and kind == "a list"):
                return DataError(f"{where}: field {key!r} is {kind} here but {seen[0]} at {seen[1]}; "
                                 f"a column must keep one type")
    return None


def diagnose_json(path: Path) -> DataError | None:
    """Why a JSON / JSON lines file did not load, naming the line (or row); None if no reason found."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return DataError(f"{path.name}: cannot read the dataset: {exc}")
    if _is_json_lines(path):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path.name}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                return DataError(f"{path.name}:{number}: invalid JSON: {exc.msg} (column {exc.colno})")
        return diagnose_rows(rows)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return DataError(f"{path.name}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(data, list):
        return DataError(f"{path.name}: expected a JSON array of objects, got {type(data).__name__}")
    return diagnose_rows([(f"{path.name}:row {i}", row) for i, row in enumerate(data, start=1)])


def _json_lines_numbers(path: Path) -> list[int]:
    """Line numbers of the non-blank lines of a JSON lines file (`datasets` skips blank lines)."""
    if path.suffix in COMPRESSIONS:
        return []  # compressed: rows are numbered instead of lines
    with open(path, encoding="utf-8", errors="replace") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def _has_content(path: Path) -> bool:
    """Whether the file holds anything but whitespace (read until the first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _csv_text_features(path: Path):
    """Every column of a CSV file read as text (from its header row)."""
    import csv

    import datasets

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def read_table(path: str | Path) -> tuple[list[dict[str, Any]], Callable[[int], str]]:
    """Every row of a dataset file or save_to_disk folder, and `where(i)` naming row i in errors.

    Raises DataError naming the file (and the first bad line when the file is unreadable).
    """
    import datasets

    path = Path(path)
    datasets.disable_progress_bars()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path}: not a dataset folder written by save_to_disk: {exc}") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{path}: the dataset has splits {sorted(loaded)}, none named 'train'")
            loaded = loaded["train"]
        return loaded.to_list(), lambda i: f"{path.name}:row {i + 1}"
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    builder = builder_of(path)
    if path.suffix not in COMPRESSIONS and not _has_content(path):
        raise DataError(f"{path}: the dataset has no rows")
    # A private cache: the arrow files datasets writes while reading go away with it.
    # CSV cells stay text as written ("2", not 2.0 when another row's cell is empty).
    options = {"features": _csv_text_features(path)} if builder == "csv" else {}
    with tempfile.TemporaryDirectory(prefix="rlhf-datasets-") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                          keep_in_memory=True, **options)
        except Exception as exc:  # datasets wraps arrow / pandas errors in many types
            reason = diagnose_json(path) if builder == "json" else None
            raise reason or DataError(f"{path.name}: cannot read as {builder}: {exc}") from exc
        rows = table.to_list()
    if _is_json_lines(path):
        lines = _json_lines_numbers(path)
        if len(lines) == len(rows):
            return rows, lambda i: f"{path.name}:{lines[i]}"
    return rows, lambda i: f"{path.name}:row {i + 1}"


# ---- field mapping and detection ----------------------------------------------------------------


def map_fields(rows: list[dict[str, Any]], fields: dict[str, str], file: str) -> list[dict[str, Any]]:
    """Rename each row's mapped columns to the names the formats read; DataError for a missing column."""
    if not fields or not rows:
        return rows
    columns = set().union(*(r.keys() for r in rows[:1]))
    for name, column in fields.items():
        if column not in columns:
            raise DataError(f"dataset.fields.{name}: column {column!r} is not in {file} "
                            f"(columns: {', '.join(sorted(columns))})")
    out = []
    for row in rows:
        row = dict(row)
        values = {name: row.pop(column) for name, column in fields.items()}
        for name in values:
            row.pop(name, None)  # a mapped column replaces one of the same name
        row.update(values)
        out.append(row)
    return out


def detect_format(rows: list[dict[str, Any]], file: str) -> str:
    """The row format `auto` stands for, from the columns with a value in the first row."""
    columns = {k for k, v in rows[0].items() if v is not None}
    for fmt, keys in DETECTION:
        if all(k in columns for k in keys):
            if fmt == "pair_list" and not isinstance(rows[0]["output"], list):
                continue
            return fmt
    raise DataError(f"{file}: cannot tell the dataset format from the columns {sorted(columns)}; "
                    f"set dataset.format, or map columns with dataset.fields (e.g. prompt: <column>)")


# ---- rows -----------------------------------------------------------------------------------------


def _dump(value: Any) -> str:
    return json.dumps(value, default=str)[:60]


def _present(row: dict[str, Any], name: str) -> bool:
    return row.get(name) is not None


def _text(row: dict[str, Any], name: str, where: str, *, optional: bool = False) -> str | None:
    value = row.get(name)
    if value is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field {name!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {_dump(value)}")
    return value


def _strings(row: dict[str, Any], name: str, where: str) -> list[str]:
    value = row.get(name)
    if value is None:
        raise DataError(f"{where}: missing field {name!r}")
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise DataError(f"{where}: field {name!r} must be a list of strings, got {_dump(value)}")
    return value


def _messages(value: Any, name: str, where: str) -> Conversation:
    """A list of {"role", "content"} dicts (keys a table filled with None are dropped)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of messages, got {_dump(value)}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {name}[{i}] must be a message object, got {_dump(message)}")
        message = {k: v for k, v in message.items() if v is not None}
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {name}[{i}] needs string 'role' and 'content', got {_dump(message)}")
        out.append(message)
    return tuple(out)


def _prompt(row: dict[str, Any], where: str) -> Prompt:
    name = next((n for n in PROMPT_ALIASES if _present(row, n)), None)
    if name is None:
        raise DataError(f"{where}: missing field 'prompt' (or 'query')")
    value = row[name]
    if isinstance(value, str):
        return value
    conversation = _messages(value, name, where)
    if conversation[-1]["role"] == "assistant":
        raise DataError(f"{where}: field {name!r} ends with an assistant turn; a prompt ends before the response")
    return conversation


def _answer(row: dict[str, Any], where: str) -> str | None:
    # Numbers are common in answers ({"answer": 7}); accept them as their text.
    value = row.get("answer")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field 'answer' must be a string or a number, got {_dump(value)}")


def _assistant_text(turns: Conversation, name: str, where: str) -> str:
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        roles = [m["role"] for m in turns]
        raise DataError(f"{where}: field {name!r} must hold one assistant message after the prompt, got roles {roles}")
    return turns[0]["content"]


def _response(row: dict[str, Any], name: str, where: str) -> str:
    """A completion given as text or as a one-message assistant list."""
    value = row.get(name)
    if isinstance(value, str):
        return value
    if value is None:
        raise DataError(f"{where}: missing field {name!r}")
    return _assistant_text(_messages(value, name, where), name, where)


def _pair(row: dict[str, Any], where: str) -> PairRecord:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        raise DataError(f"{where}: missing field {'chosen' if chosen is None else 'rejected'!r}")
    if isinstance(chosen, str) and isinstance(rejected, str):
        return PairRecord(_prompt(row, where), chosen, rejected, where)
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")
    c, r = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
    shared = 0
    while shared < min(len(c), len(r)) - 1 and c[shared] == r[shared]:
        shared += 1
    # Whole conversations (implicit prompt: the turns both share), or only the answers after `prompt`.
    prompt: Prompt = c[:shared] if shared else _prompt(row, where)
    return PairRecord(prompt, _assistant_text(c[shared:], "chosen", where),
                      _assistant_text(r[shared:], "rejected", where), where)


def _instruction(row: dict[str, Any], where: str) -> SFTRecord:
    history = row.get("history") or []
    ok = isinstance(history, list) and all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history
    )
    if not ok:
        raise DataError(f"{where}: field 'history' must be a list of [question, answer] string pairs")
    instruction = _text(row, "instruction", where)
    input_text = _text(row, "input", where, optional=True)
    turns: list[dict[str, str]] = []
    for question, answer in history:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    # Alpaca's input goes below the instruction in the same user turn (as in ShareGPT conversions).
    turns.append({"role": "user", "content": f"{instruction}\n\n{input_text}" if input_text else instruction})
    return SFTRecord(tuple(turns), _text(row, "output", where), where)


def _conversation(row: dict[str, Any], where: str) -> SFTRecord:
    turns = _messages(row.get("messages"), "messages", where)
    if turns[-1]["role"] != "assistant" or len(turns) < 2:
        raise DataError(f"{where}: field 'messages' must end with an assistant turn after at least one other turn")
    return SFTRecord(turns[:-1], turns[-1]["content"], where)


def _steps(row: dict[str, Any], where: str) -> StepRecord:
    """TRL's stepwise row: prompt, completions (the steps), labels (one per step: bool or -1..1)."""
    from rlhf_trainer.losses.prm import label_target

    steps = _strings(row, "completions", where)
    labels = row.get("labels")
    if not isinstance(labels, list) or len(labels) != len(steps) or not steps:
        raise DataError(f"{where}: field 'labels' must be a list with one label per completion step "
                        f"({len(steps)} steps), got {_dump(labels)}")
    try:
        targets = tuple(label_target(label) for label in labels)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: field 'labels': {exc}") from None
    return StepRecord(_prompt(row, where), tuple(steps), targets, where)


def parse_row(row: Any, fmt: str, where: str) -> list[Record]:
    """One row (a dict of column values) in format `fmt` -> its records (ranked rows give several)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {_dump(row)}")
    if fmt == "prompts":
        return [PromptRecord(_prompt(row, where), _answer(row, where), where)]
    if fmt == "pairs":
        return [_pair(row, where)]
    if fmt == "instruction":
        return [_instruction(row, where)]
    if fmt == "messages":
        return [_conversation(row, where)]
    if fmt == "completion":
        return [SFTRecord(_prompt(row, where), _response(row, "completion", where), where)]
    if fmt == "ranked":
        outputs = _strings(row, "outputs", where)
        if len(outputs) < 2:
            raise DataError(f"{where}: field 'outputs' needs at least 2 responses (best first), got {len(outputs)}")
        prompt = _prompt(row, where)
        return [PairRecord(prompt, better, worse, where)
                for i, better in enumerate(outputs) for worse in outputs[i + 1:]]
    if fmt == "stepwise":
        return [_steps(row, where)]
    if fmt == "pair_list":
        output = _strings(row, "output", where)
        if len(output) != 2:
            raise DataError(f"{where}: field 'output' must be [chosen, rejected], got {len(output)} responses")
        return [PairRecord(_prompt(row, where), output[0], output[1], where)]
    raise ConfigError(f"dataset.format: unknown format {fmt!r} (choose from {', '.join(DATASET_FORMATS)})")


def read_records(path: str | Path, fmt: str, fields: dict[str, str] | None = None) -> tuple[list[Record], str]:
    """Every record of a dataset file or folder, and the row format read (`auto` resolved).

    Raises DataError naming the file and row for a bad row, a missing file or an unmapped column.
    """
    path = Path(path)
    rows, where = read_table(path)
    if not rows:
        raise DataError(f"{path}: the dataset has no rows")
    rows = map_fields(rows, fields or {}, path.name)
    if fmt == "auto":
        fmt = detect_format(rows, path.name)
    records: list[Record] = []
    for i, row in enumerate(rows):
        records.extend(parse_row(row, fmt, where(i)))
    return records, fmt
