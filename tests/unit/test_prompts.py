"""Unit layer: prompt files are parsed whole, and every rejection names file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxl_split.shared.errors import UserError
from sdxl_split.shared.prompts import PromptEntry, parse_prompt_file


def _write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def _jsonl(tmp_path: Path, *objects: object, name: str = "p.jsonl") -> Path:
    return _write(tmp_path, name, "".join(json.dumps(o) + "\n" for o in objects))


def test_plain_text_skips_and_counts_blank_and_comment_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.txt", "a cat\n\n# a comment\n   \n  a dog  \n  # indented comment\n")
    parsed = parse_prompt_file(path)
    assert [(e.line, e.prompt) for e in parsed.entries] == [(1, "a cat"), (5, "a dog")]
    assert parsed.skipped_lines == 4
    assert all(e.negative_prompt is None and e.seed is None and e.count is None for e in parsed.entries)


def test_plain_text_line_starting_with_brace_stays_text_in_a_txt_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.txt", "{curly} castle\n")
    assert parse_prompt_file(path).entries[0].prompt == "{curly} castle"


def test_jsonl_with_every_field(tmp_path: Path) -> None:
    full = {"prompt": "a cat", "prompt_2": "oil painting", "negative_prompt": "blurry",
            "negative_prompt_2": "low quality", "seed": 7, "count": 3, "id": "cat-1"}
    path = _jsonl(tmp_path, full, {"prompt": "a dog"})
    entries = parse_prompt_file(path).entries
    assert entries[0] == PromptEntry(line=1, **full)
    assert entries[1] == PromptEntry(line=2, prompt="a dog")
    assert entries[0].texts() == {"prompt": "a cat", "prompt_2": "oil painting", "negative_prompt": "blurry",
                                  "negative_prompt_2": "low quality"}


def test_jsonl_detected_from_content_without_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path, "prompts", '# header\n{"prompt": "a cat", "seed": 1}\n')
    assert parse_prompt_file(path).entries == (PromptEntry(line=2, prompt="a cat", seed=1),)


def test_bom_and_crlf_are_tolerated(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.txt", b"\xef\xbb\xbfa cat\r\n# note\r\na dog\r\n")
    parsed = parse_prompt_file(path)
    assert [(e.line, e.prompt) for e in parsed.entries] == [(1, "a cat"), (3, "a dog")]
    jsonl = _write(tmp_path, "p.jsonl", b'\xef\xbb\xbf{"prompt": "a cat"}\r\n{"prompt": "a dog"}\r\n')
    assert [e.prompt for e in parse_prompt_file(jsonl).entries] == ["a cat", "a dog"]


def test_default_negative_applies_only_where_none_given(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, {"prompt": "a"}, {"prompt": "b", "negative_prompt": "own"},
                  {"prompt": "c", "negative_prompt": ""})
    negatives = [e.negative_prompt for e in parse_prompt_file(path, default_negative="blurry").entries]
    # An explicit empty negative is the user's choice, not a missing one.
    assert negatives == ["blurry", "own", ""]
    assert [e.negative_prompt for e in parse_prompt_file(path).entries] == [None, "own", ""]


def _rejection(path: Path) -> str:
    with pytest.raises(UserError) as caught:
        parse_prompt_file(path)
    return str(caught.value)


@pytest.mark.parametrize(
    ("name", "data", "line", "words"),
    [
        ("latin1.txt", "a cat\ncaf\u00e9 au lait\n".encode("latin-1"), 2, "UTF-8"),
        ("nul.txt", b"a cat\na\x00dog\n", 2, "NUL"),
        ("nul.jsonl", b'{"prompt": "a"}\n{"prompt": "a\x00"}\n', 2, "NUL"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', 2, "invalid JSON"),
        ("unknown.jsonl", '{"prompt": "a", "negative": "x"}\n', 1, "unknown field 'negative'"),
        ("list.jsonl", '{"prompt": "a"}\n["a cat"]\n', 2, "JSON object"),
        ("string.jsonl", '{"prompt": "a"}\n# c\n"a cat"\n', 3, "JSON object"),
        ("noprompt.jsonl", '{"seed": 1}\n', 1, "'prompt' is required"),
        ("blankprompt.jsonl", '{"prompt": "  "}\n', 1, "'prompt' is required"),
        ("seedstr.jsonl", '{"prompt": "a", "seed": "7"}\n', 1, "'seed' must be an integer"),
        ("seedbool.jsonl", '{"prompt": "a", "seed": true}\n', 1, "'seed' must be an integer"),
        ("seedfloat.jsonl", '{"prompt": "a", "seed": 1.5}\n', 1, "'seed' must be an integer"),
        ("seedneg.jsonl", '{"prompt": "a", "seed": -2}\n', 1, "'seed' must be an integer from -1"),
        ("countbool.jsonl", '{"prompt": "a", "count": false}\n', 1, "'count' must be an integer"),
        ("countzero.jsonl", '{"prompt": "a", "count": 0}\n', 1, "'count' must be an integer"),
        ("counthuge.jsonl", '{"prompt": "a", "count": 65}\n', 1, "'count' must be an integer"),
        ("negint.jsonl", '{"prompt": "a", "negative_prompt": 3}\n', 1, "'negative_prompt' must be a string"),
        ("idint.jsonl", '{"prompt": "a", "id": 3}\n', 1, "'id' must be a string"),
        ("dupid.jsonl", '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "y"}\n{"prompt": "c", "id": "x"}\n',
         3, "'x' is already used on line 1"),
    ],
)
def test_rejections_name_file_and_line(tmp_path: Path, name: str, data: bytes | str, line: int, words: str) -> None:
    message = _rejection(_write(tmp_path, name, data))
    assert message.startswith(f"{tmp_path / name}:{line}: ")
    assert words in message
    assert "\n" not in message


@pytest.mark.parametrize("data", ["", "\n\n", "# only\n  # comments\n\n", "\ufeff"])
def test_file_without_prompts_is_rejected(tmp_path: Path, data: str) -> None:
    path = _write(tmp_path, "empty.txt", data)
    message = _rejection(path)
    assert message.startswith(f"{path}: ") and "no prompts" in message


def test_missing_file_and_folder_are_user_errors(tmp_path: Path) -> None:
    assert "no such prompt file" in _rejection(tmp_path / "absent.txt")
    assert "is a folder" in _rejection(tmp_path)


def test_overlong_and_unencodable_prompts_are_refused_with_their_line(tmp_path: Path) -> None:
    long_file = tmp_path / "long.txt"
    long_file.write_text("ok\n" + "x" * 17000 + "\n")
    with pytest.raises(UserError, match=r"long.txt:2: prompt is 17000 characters"):
        parse_prompt_file(long_file)
    surrogate = tmp_path / "s.jsonl"
    surrogate.write_text('{"prompt": "a \\ud800 b"}\n')
    with pytest.raises(UserError, match=r"s.jsonl:1: .*surrogate"):
        parse_prompt_file(surrogate)
