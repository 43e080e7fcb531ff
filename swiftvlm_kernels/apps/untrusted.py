"""Readers of untrusted text files (a dataset's questions.jsonl, a checkpoint's vocab.json and
prompt.json): JSON values, JSON-lines files read a line at a time, and text fields. Every refusal is
a ValueError naming the file and the line: not UTF-8, not JSON, an integer too long to convert,
nesting too deep for the parser, a line or a file too long, a lone surrogate or a NUL character."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

MAX_LINE_BYTES = 1 << 20  # a line of a JSON-lines file


def open_binary(path: Path):
    """path opened for reading bytes; an OSError as a ValueError naming it."""
    try:
        return path.open("rb")
    except OSError as e:
        raise ValueError(f"{path}: expected a readable file ({e.strerror or type(e).__name__})") from None


def _text(data: bytes, where: str, lines: bool = False) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        start, number = data.rfind(b"\n", 0, e.start) + 1, data.count(b"\n", 0, e.start) + 1
        line = f"line {number} " if lines else ""
        raise ValueError(f"{where}: expected UTF-8 text, got the byte {data[e.start:e.start + 1]!r} at {line}"
                         f"column {e.start - start + 1}") from None


def json_value(text: str, where: str, expected: str = "JSON", lines: bool = False):
    """The JSON value `text` holds; else ValueError "{where}: expected {expected} (why)", with the
    column where the parser stopped, and its line when `lines` (a whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = f"line {e.lineno} " if lines else ""
        why = f"{e.msg.removesuffix(' at')} at {line}column {e.colno}"
    except RecursionError:
        why = "nested too deeply"
    except ValueError as e:  # an integer of more digits than int() converts
        why = str(e).split(":")[0]
    raise ValueError(f"{where}: expected {expected} ({why})")


def read_json(path, max_bytes: int):
    """The JSON value of a whole UTF-8 file of at most max_bytes."""
    path = Path(path)
    with open_binary(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: expected at most {max_bytes} bytes")
    return json_value(_text(data, str(path), lines=True), str(path), lines=True)


def jsonl_lines(path, max_lines: Optional[int] = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file (lines end at \\n, \\r\\n or \\r, as in
    text mode), read a line at a time; a line is at most MAX_LINE_BYTES, the file at most
    max_lines lines."""
    path = Path(path)
    number = 0
    with open_binary(path) as f:
        while True:
            data = f.readline(MAX_LINE_BYTES + 1)
            if not data:
                return
            if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
                raise ValueError(f"{path} line {number + 1}: expected at most {MAX_LINE_BYTES} bytes a line")
            parts = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            for part in parts[:-1] if data.endswith((b"\n", b"\r")) else parts:
                number += 1
                if max_lines is not None and number > max_lines:
                    raise ValueError(f"{path}: expected at most {max_lines} lines")
                yield number, _text(part, f"{path} line {number}")


def check_text(value: str, where: str) -> str:
    """value, refused when it holds a NUL character or a lone surrogate (text that cannot be
    written as UTF-8: a JSON "\\ud800" escape)."""
    if "\0" in value:
        raise ValueError(f"{where}: expected text without NUL characters, got {value!r:.80}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: expected valid Unicode text, got a lone surrogate "
                         f"U+{ord(value[e.start]):04X} in {value!r:.80}") from None
    return value
