"""Training records and the JSONL files a data party keeps them in.

Three record formats are accepted, detected per line:

- ``{"prompt": ..., "completion": ...}``: the loss covers the completion only.
- ``{"text": ...}``: the loss covers every token (the prompt is empty).
- Alpaca, ``{"instruction": ..., "input": ..., "output": ...}`` with ``input`` optional: the prompt is
  built with `ALPACA_PROMPT` or `ALPACA_PROMPT_WITH_INPUT`, the completion is the output.

Any record may carry a string ``"label"`` (an intent or category) used for partitioning and metrics.
Other keys are ignored, so files exported by other tools load as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitprefix.errors import DataFormatError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
"""Stanford Alpaca's prompt for a record whose ``input`` is absent or empty."""

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""Stanford Alpaca's prompt for a record with a non-empty ``input``."""

_FORMATS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # name: (required keys, optional keys); each key belongs to exactly one format.
    "prompt/completion": (frozenset({"prompt", "completion"}), frozenset()),
    "text": (frozenset({"text"}), frozenset()),
    "alpaca": (frozenset({"instruction", "output"}), frozenset({"input"})),
}
_EXPECTED = '{"prompt", "completion"}, {"text"} or {"instruction", "input" (optional), "output"}'


@dataclass(frozen=True)
class Example:
    """One training record, already reduced to a prompt and the completion the loss is taken on."""

    prompt: str
    """Text the model conditions on; no loss is taken on it. Empty for plain-text records."""
    completion: str
    """Text the model learns to produce after the prompt; never empty."""
    label: str | None = None
    """Optional intent or category, used to partition data and to report per-label metrics."""


def load_jsonl(path: str | Path) -> list[Example]:
    """Read every record of a JSONL file; blank lines are skipped.

    Raises `DataFormatError` naming ``file:line`` on the first malformed line, and on a file without
    any record.
    """
    path = Path(path)
    examples: list[Example] = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            line = _decode(raw, where)
            if line.strip():
                examples.append(parse_record(_parse_json(line, where), where))
    if not examples:
        raise DataFormatError(f"{path}: the file holds no record, expected at least one JSON object line")
    return examples


def parse_record(record: object, where: str = "<record>") -> Example:
    """Turn one decoded JSON value into an `Example`; ``where`` prefixes error messages."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: found {_json_type(record)}, expected a JSON object")
    fmt = _detect_format(record, where)
    required, optional = _FORMATS[fmt]
    for key in sorted((required | optional | {"label"}) & record.keys()):
        value = record[key]
        # null stands for "absent" in optional fields, as exporters often write it that way.
        if not isinstance(value, str) and not (value is None and key not in required):
            raise DataFormatError(f'{where}: "{key}" is {_json_type(value)}, expected a string')
    example = _to_example(fmt, record)
    if not example.completion:
        key = {"prompt/completion": "completion", "text": "text", "alpaca": "output"}[fmt]
        raise DataFormatError(f'{where}: "{key}" is empty, expected a non-empty string to train on')
    return example


def write_jsonl(path: str | Path, records: Iterable[Example | Mapping[str, Any]]) -> None:
    """Write records one JSON object a line (UTF-8); an `Example` is written in prompt/completion form.

    The parent folder is created if needed. `load_jsonl` reads the file back to equal examples.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            obj = example_to_record(record) if isinstance(record, Example) else dict(record)
            handle.write(json.dumps(obj, ensure_ascii=False) + "\n")


def example_to_record(example: Example) -> dict[str, str]:
    """The prompt/completion JSON object of an example; ``label`` only when it is set."""
    record = {"prompt": example.prompt, "completion": example.completion}
    if example.label is not None:
        record["label"] = example.label
    return record


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for an instruction, with the input section only when ``input_text`` is set."""
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(
            f"{where}: the line is not valid UTF-8 ({err.reason}), expected UTF-8 text"
        ) from err


def _parse_json(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{where}: invalid JSON ({err.msg} at column {err.colno}), expected one JSON object per line"
        ) from err


def _detect_format(record: Mapping[str, object], where: str) -> str:
    matches = [name for name, (req, opt) in _FORMATS.items() if (req | opt) & record.keys()]
    if len(matches) > 1:
        found = sorted(k for name in matches for k in (_FORMATS[name][0] | _FORMATS[name][1]) & record.keys())
        raise DataFormatError(
            f"{where}: keys {found} mix the {' and '.join(matches)} formats, expected keys of exactly one of "
            f"{_EXPECTED}"
        )
    if not matches:
        raise DataFormatError(f"{where}: found keys {sorted(record.keys())}, expected {_EXPECTED}")
    required = _FORMATS[matches[0]][0]
    missing = sorted(required - record.keys())
    if missing:
        raise DataFormatError(
            f"{where}: {matches[0]} record lacks {missing}, expected all of {sorted(required)}"
        )
    return matches[0]


def _to_example(fmt: str, record: Mapping[str, Any]) -> Example:
    label = record.get("label")
    if fmt == "prompt/completion":
        return Example(record["prompt"], record["completion"], label)
    if fmt == "text":
        return Example("", record["text"], label)
    return Example(alpaca_prompt(record["instruction"], record.get("input") or ""), record["output"], label)


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "an array", str: "a string"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
