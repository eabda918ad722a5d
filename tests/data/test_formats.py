"""JSONL loading: every record format, and malformed input reported as file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitprefix.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    Example,
    alpaca_prompt,
    load_jsonl,
    write_jsonl,
)
from splitprefix.errors import DataFormatError


def _write_lines(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_prompt_completion_record_keeps_both_parts_and_label(tmp_path: Path) -> None:
    path = _write_lines(tmp_path, json.dumps({"prompt": "Q:", "completion": " A", "label": "x"}))

    assert load_jsonl(path) == [Example("Q:", " A", "x")]


def test_text_record_has_empty_prompt(tmp_path: Path) -> None:
    path = _write_lines(tmp_path, json.dumps({"text": "all of it"}))

    assert load_jsonl(path) == [Example("", "all of it", None)]


def test_alpaca_record_without_input_uses_the_short_template(tmp_path: Path) -> None:
    path = _write_lines(tmp_path, json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}))

    (example,) = load_jsonl(path)

    assert example.prompt == ALPACA_PROMPT.format(instruction="Say hi")
    assert "### Input" not in example.prompt
    assert example.completion == "hi"


def test_alpaca_record_with_input_uses_the_input_template(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path, json.dumps({"instruction": "Add", "input": "2 2", "output": "4", "label": "math"})
    )

    (example,) = load_jsonl(path)

    assert example.prompt == ALPACA_PROMPT_WITH_INPUT.format(instruction="Add", input="2 2")
    assert example.prompt.endswith("### Input:\n2 2\n\n### Response:\n")
    assert example == Example(alpaca_prompt("Add", "2 2"), "4", "math")


def test_blank_lines_and_unknown_keys_are_ignored(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path, "", json.dumps({"text": "a", "id": 7, "meta": {"x": 1}}), "   ", json.dumps({"text": "b"})
    )

    assert [e.completion for e in load_jsonl(path)] == ["a", "b"]


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    examples = [Example("p", "c", "lbl"), Example("", "text only"), Example("é", "ü ✓", None)]
    path = tmp_path / "sub" / "out.jsonl"

    write_jsonl(path, examples)

    assert load_jsonl(path) == examples


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "found an array, expected a JSON object"),
        ('"just a string"', "found a string, expected a JSON object"),
        ('{"foo": "bar"}', "expected"),
        ('{"prompt": "only a prompt"}', "lacks ['completion']"),
        ('{"text": "t", "prompt": "p", "completion": "c"}', "mix the"),
        ('{"instruction": "i", "input": "x"}', "lacks ['output']"),
        ('{"prompt": "p", "completion": 3}', '"completion" is a number, expected a string'),
        ('{"text": "t", "label": ["a"]}', '"label" is an array, expected a string'),
        ('{"prompt": "p", "completion": ""}', '"completion" is empty'),
        ('{"text": ""}', '"text" is empty'),
        ('{"instruction": "i", "output": ""}', '"output" is empty'),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = _write_lines(tmp_path, json.dumps({"text": "fine"}), "", line)

    with pytest.raises(DataFormatError) as info:
        load_jsonl(path)

    assert f"{path}:3:" in str(info.value)
    assert message in str(info.value)


def test_non_utf8_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')

    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: .*UTF-8"):
        load_jsonl(path)


def test_null_optional_fields_count_as_absent(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path, json.dumps({"instruction": "i", "input": None, "output": "o", "label": None})
    )

    assert load_jsonl(path) == [Example(alpaca_prompt("i"), "o", None)]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(DataFormatError, match="holds no record"):
        load_jsonl(path)
