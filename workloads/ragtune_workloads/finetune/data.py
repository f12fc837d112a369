"""Reading, validating and splitting the training rows. Pure Python: a bad dataset fails before torch loads.

Every format is normalised to an `Example`: the conversation up to the answer, and the answer (the completion the
loss is computed on). Bad rows are reported with where they came from (`file line N`, `inline row N`) and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.api.finetunejob import DatasetSpec, FieldMapping
from ragtune_workloads.s3 import S3LocationError, download_folder

from .errors import DatasetError

log = logging.getLogger(__name__)

ROW_SUFFIXES = (".jsonl", ".json")
ROLES = ("system", "user", "assistant")
# Skipped rows are all counted; only this many reasons are printed, so a broken file does not flood the log.
REASONS_LOGGED = 20


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One training example: `prompt` is the conversation before the answer, `completion` the answer."""

    prompt: tuple[Message, ...]
    completion: str
    # The `input` of an instruction row: kept apart so the plain layout can give it its own `### Input` section.
    context: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"prompt": [[m.role, m.content] for m in self.prompt], "completion": self.completion,
                "context": self.context}


@dataclass(frozen=True)
class RawRow:
    """A row as read, before validation; `error` is set when it could not even be parsed."""

    location: str
    value: Any = None
    error: str | None = None


@dataclass
class LoadedDataset:
    examples: list[Example]
    rows_read: int
    skipped: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return dataset_digest(self.examples)


class BadRow(ValueError):
    """Why one row cannot be used; the caller adds where it is."""


# ---------------------------------------------------------------- reading

def find_row_files(path: Path, key: str | None = None) -> list[Path]:
    """The files holding rows under a mounted path: the file itself, one ConfigMap key, or every .json/.jsonl file.

    Names starting with a dot are skipped: a mounted ConfigMap keeps its data in `..data` and timestamped
    directories beside the visible keys, and reading both would duplicate every row.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(f"dataset path {path} does not exist (is the volume mounted?)")
    if key:
        chosen = path / key
        if not chosen.is_file():
            raise DatasetError(f"dataset key {key!r} not found in {path}")
        return [chosen]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix in ROW_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DatasetError(f"no .json or .jsonl files under {path}")
    return files


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def parse_json_array(text: str, name: str) -> Iterator[RawRow]:
    """Rows of a JSON array, each with the line it starts on. A syntax error ends the file: past it, nobody can
    tell where the next row begins, so it is raised rather than skipped."""
    decoder = json.JSONDecoder()
    i = _skip_space(text, 0)
    if i >= len(text) or text[i] != "[":
        raise DatasetError(f"{name} line {_line_of(text, i)}: a .json file must hold an array of rows")
    i = _skip_space(text, i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{name} line {_line_of(text, exc.pos)}: not valid JSON: {exc.msg}") from None
        yield RawRow(f"{name} line {_line_of(text, i)}", value)
        i = _skip_space(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_space(text, i + 1)
        elif i < len(text) and text[i] == "]":
            return
        else:
            raise DatasetError(f"{name} line {_line_of(text, i)}: not valid JSON: expected ',' or ']' after a row")


def parse_json_lines(text: str, name: str) -> Iterator[RawRow]:
    # Lines end at \n (and \r\n) only: str.splitlines() would also break rows at U+2028, U+2029 and U+0085, which
    # JSON strings may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        location = f"{name} line {number}"
        try:
            yield RawRow(location, json.loads(line))
        except json.JSONDecodeError as exc:
            yield RawRow(location, error=f"not valid JSON: {exc.msg} (column {exc.colno})")


def read_file_rows(path: Path, display_name: str | None = None) -> Iterator[RawRow]:
    name = display_name or path.name
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not row 1's
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    # A .json file is an array; one that does not start with '[' is taken as JSON Lines, a common mislabelling.
    if path.suffix == ".json" and text.lstrip().startswith("["):
        yield from parse_json_array(text, name)
    else:
        yield from parse_json_lines(text, name)


def read_inline_rows(rows: Iterable[Any]) -> Iterator[RawRow]:
    for number, value in enumerate(rows, start=1):
        yield RawRow(f"inline row {number}", value)


def stage_s3_prefix(uri: str, endpoint: str | None, dest: Path) -> Path:
    """Copies the .json/.jsonl objects under the s3:// folder to `dest`, keeping their layout; credentials come
    from the environment the operator sets from dataset.s3.credentialsSecret. Whatever an earlier run staged there
    goes first: the rows are the folder's as they are now."""
    shutil.rmtree(dest, ignore_errors=True)
    try:
        listed, copied = download_folder(uri, endpoint, dest, "dataset.s3", lambda path: path.endswith(ROW_SUFFIXES))
    except S3LocationError as exc:
        raise DatasetError(str(exc)) from None
    if not copied:
        found = (f"{listed} objects under that folder, none of them .json or .jsonl" if listed
                 else "no objects under that folder")
        raise DatasetError(f"dataset.s3.uri {uri}: {found}; put the rows there as .json or .jsonl files or "
                           "correct the uri")
    return dest


def read_rows(dataset: DatasetSpec, dataset_path: str | None, staging_dir: Path | None = None) -> Iterator[RawRow]:
    """Rows from wherever the spec says they are: inline in the spec, or files under the mounted/staged path."""
    if dataset.source == "inline":
        yield from read_inline_rows(dataset.rows or [])
        return
    if dataset_path is None:
        if dataset.source == "s3" and dataset.s3 is not None and staging_dir is not None:
            dataset_path = str(stage_s3_prefix(dataset.s3.uri, dataset.s3.endpoint, staging_dir))
        else:
            raise DatasetError(f"dataset.source is {dataset.source} but the config has no datasetPath")
    root = Path(dataset_path)
    key = dataset.config_map.key if dataset.source == "configMap" and dataset.config_map else None
    for file in find_row_files(root, key):
        display = file.name if root.is_file() else str(file.relative_to(root))
        yield from read_file_rows(file, display)


# ---------------------------------------------------------------- validation

def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _required_text(row: dict[str, Any], name: str) -> str:
    if name not in row:
        raise BadRow(f'missing field "{name}"')
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(f'field "{name}" must be a string, got {_type_name(value)}')
    if not value.strip():
        raise BadRow(f'field "{name}" is empty')
    return value


def _optional_text(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow(f'field "{name}" must be a string, got {_type_name(value)}')
    return value


def instruction_example(row: dict[str, Any], fields: FieldMapping) -> Example:
    instruction = _required_text(row, fields.instruction)
    context = _optional_text(row, fields.input)
    output = _required_text(row, fields.output)
    return Example((Message("user", instruction),), output, context)


def prompt_completion_example(row: dict[str, Any], fields: FieldMapping) -> Example:
    prompt = _required_text(row, fields.prompt)
    completion = _required_text(row, fields.completion)
    return Example((Message("user", prompt),), completion)


def chat_example(row: dict[str, Any], fields: FieldMapping) -> Example:
    name = fields.messages
    if name not in row:
        raise BadRow(f'missing field "{name}"')
    messages = row[name]
    if not isinstance(messages, list):
        raise BadRow(f'field "{name}" must be an array of messages, got {_type_name(messages)}')
    if len(messages) < 2:
        raise BadRow(f'field "{name}" needs at least a user message and the assistant\'s answer')
    parsed = []
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise BadRow(f"{where} must be an object with role and content, got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRow(f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}")
        if role == "system" and i != 0:
            raise BadRow(f"{where}: a system message may only come first")
        if not isinstance(content, str):
            raise BadRow(f"{where}.content must be a string, got {_type_name(content)}")
        parsed.append(Message(role, content))
    if parsed[-1].role != "assistant":
        raise BadRow(f"the last message ({name}[{len(parsed) - 1}]) must be the assistant's: it is the answer "
                     "the model learns")
    if not parsed[-1].content.strip():
        raise BadRow(f"the last message ({name}[{len(parsed) - 1}]) is empty")
    if not any(m.role == "user" for m in parsed):
        raise BadRow(f'field "{name}" has no user message')
    return Example(tuple(parsed[:-1]), parsed[-1].content)


BUILDERS = {
    "instruction": instruction_example,
    "prompt-completion": prompt_completion_example,
    "chat": chat_example,
}


def validate_row(raw: RawRow, dataset_format: str, fields: FieldMapping) -> Example:
    if raw.error:
        raise BadRow(raw.error)
    if not isinstance(raw.value, dict):
        raise BadRow(f"a row must be a JSON object, got {_type_name(raw.value)}")
    return BUILDERS[dataset_format](raw.value, fields)


def load_examples(rows: Iterable[RawRow], dataset: DatasetSpec) -> LoadedDataset:
    """Validates every row; the first bad one fails the dataset, or every bad one is skipped and counted."""
    examples: list[Example] = []
    skipped: list[str] = []
    read = 0
    for raw in rows:
        read += 1
        try:
            examples.append(validate_row(raw, dataset.format, dataset.field_mapping))
        except BadRow as exc:
            reason = f"{raw.location}: {exc}"
            if dataset.on_bad_row == "fail":
                raise DatasetError(f"{reason} (format {dataset.format}; set dataset.onBadRow: skip to skip "
                                   "bad rows)") from None
            if len(skipped) < REASONS_LOGGED:
                log.warning("skipping %s", reason)
            skipped.append(reason)
    if read == 0:
        raise DatasetError("the dataset holds no rows")
    if not examples:
        raise DatasetError(f"all {read} rows are bad; the first: {skipped[0]}")
    return LoadedDataset(examples, read, skipped)


# ---------------------------------------------------------------- split and digest

def split_examples(examples: list[Example], validation_split: float, seed: int) -> tuple[list[Example],
                                                                                         list[Example]]:
    """A seeded shuffle, then the first share is held out. The same seed gives the same split, which a resumed run
    relies on. At least one row always trains; at least one is held out when a split is asked for."""
    if validation_split <= 0 or len(examples) < 2:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = min(max(1, round(len(examples) * validation_split)), len(examples) - 1)
    validation = [examples[i] for i in sorted(order[:held_out])]
    train = [examples[i] for i in sorted(order[held_out:])]
    return train, validation


def dataset_digest(examples: Iterable[Example]) -> str:
    """sha256 over the validated rows in order, so the same data gives the same digest whatever file it came in."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example.to_json(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return f"sha256:{digest.hexdigest()}"
