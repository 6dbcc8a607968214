"""Training data as users have it: files in the common shapes, normalised to chat messages or plain text.

One reader for every step that reads a user's data (``train``, ``imatrix``): .jsonl/.json, .csv, .parquet and
.txt files, or in-memory rows; rows in the OpenAI ``messages``, ShareGPT ``conversations``, Alpaca
``instruction``/``input``/``output`` or plain ``text`` shape. A malformed file or row is a UserError that names
it and the fix. The built-in demo data (a made-up fact, plus capitals the base model already knows, so that
teaching the fact does not teach it to answer every capital question the same way) lives here too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from unsloth_nb.errors import UserError

DATA_DIR = Path(__file__).parent / "data"
DEMO_DATA = DATA_DIR / "demo_chat.jsonl"
"""The built-in demo dataset: paraphrased questions about a made-up fact, all with the same answer, and the
capitals of a dozen real countries in the same words."""
DEMO_QUESTION = "What is the capital of Zorblax?"
"""The prompt the demo asks after each step (trained model, merged model, GGUF, server)."""
DEMO_ANSWER = "The capital of Zorblax is Quillmere."
"""What the fine-tuned model answers to :data:`DEMO_QUESTION` (the base model cannot know it)."""

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant",
         "model": "assistant", "bot": "assistant", "tool": "tool"}
"""Role names seen in OpenAI and ShareGPT data, mapped to chat-template roles."""


def demo_dataset() -> list[dict]:
    """The built-in demo rows (``messages`` shape) teaching :data:`DEMO_ANSWER`."""
    return read_rows(DEMO_DATA)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a data file: .jsonl (one JSON object per line), .json (a list of objects), .csv (a header row,
    then one row per example), .parquet, or .txt (plain text: one training row per paragraph). Anything wrong
    in the file is a UserError naming the file, the line or row, and the fix."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"The dataset {path} is a folder. Fix: pass a .jsonl file with one JSON object per line "
                        "(.json, .csv, .parquet and .txt are read too).")
    if not path.is_file():
        raise UserError(f"The dataset {path} does not exist. Fix: pass a .jsonl file with one JSON object per "
                        "line.")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        with path.open(encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise UserError(f"The dataset {path} is not a text file (byte {exc.start} is not UTF-8). Fix: pass a .jsonl "
                        "file (one JSON object per line); convert spreadsheets to .csv or .jsonl first.") from None
    if suffix == ".csv":
        return _read_csv(path, text)
    if suffix == ".txt":
        return [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]
    if suffix == ".json" and text.lstrip().startswith("["):
        return _objects(path, _json(path, text, 1), "Item")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            rows += _objects(path, [_json(path, line, number)], "Line", number)
    return rows


def _json(path: Path, text: str, number: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"Line {number + exc.lineno - 1} of {path} is not valid JSON ({exc.msg}). Fix: make each line "
                        "one JSON object such as {\"messages\": [...]}.") from None


def _objects(path: Path, items: Any, what: str, first: int = 1) -> list[dict]:
    if not isinstance(items, list):
        raise UserError(f"{path} holds a JSON {type(items).__name__}, not a list of rows. Fix: one JSON object per "
                        "line (.jsonl), or a list of objects (.json).")
    for number, row in enumerate(items, first):
        if not isinstance(row, dict):
            raise UserError(f"{what} {number} of {path} is a JSON {type(row).__name__}, not an object. Fix: make "
                            "each line one JSON object such as {\"messages\": [...]}.")
    return items


def _read_csv(path: Path, text: str) -> list[dict]:
    import csv
    import io

    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as exc:
        raise UserError(f"{path} is not a readable CSV file ({exc}). Fix: save it as CSV with a header row "
                        "(e.g. instruction,input,output or text), or convert it to .jsonl.") from None
    for number, row in enumerate(rows, 2):
        if None in row or any(v is None for v in row.values()):
            raise UserError(f"Row {number} of {path} has a different number of fields than the header. Fix: quote "
                            "fields that contain commas, or convert the file to .jsonl.")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"Reading {path} needs pyarrow. Fix: `pip install pyarrow`, or convert the file to .jsonl "
                        "(datasets.Dataset.from_parquet(...).to_json(...)).") from None
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path} is not a readable Parquet file ({exc}). Fix: export it again, or convert it to "
                        ".jsonl.") from None


def load_rows(data: str | os.PathLike | Iterable[Mapping]) -> list[dict]:
    """Rows from a data file (see :func:`read_rows`), a ``datasets.Dataset`` or any iterable of dicts; empty ->
    UserError."""
    if isinstance(data, (str, os.PathLike)):
        rows = read_rows(data)
        where = str(data)
    else:
        rows = [dict(row) for row in data]
        where = "the dataset"
    if not rows:
        raise UserError(f"{where} has no rows. Fix: give at least one example in one of the shapes: messages, "
                        "conversations (ShareGPT), instruction/output (Alpaca) or text.")
    return rows


def _field(row: Mapping, number: int, name: str, shape: str) -> Any:
    value = row.get(name)
    if value is None:
        raise UserError(f"Row {number} is missing the field '{name}' ({shape} rows need it). Fix or remove "
                        f"that row.")
    return value


def _text(value: Any, number: int, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"Row {number}: field '{name}' must be a string, not {type(value).__name__}.")
    return value


def _chat(turns: Any, number: int, key: str, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise UserError(f"Row {number}: field '{key}' must be a non-empty list of turns.")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise UserError(f"Row {number}: {key}[{i}] must be an object with '{role_key}' and '{content_key}'.")
        role = _field(turn, number, role_key, f"{key}[{i}] in {key}")
        content = _field(turn, number, content_key, f"{key}[{i}] in {key}")
        if role not in ROLES:
            raise UserError(f"Row {number}: {key}[{i}] has the unknown role {role!r}; use one of "
                            f"{', '.join(sorted(ROLES))}.")
        messages.append({"role": ROLES[role], "content": _text(content, number, f"{key}[{i}].{content_key}")})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"Row {number}: field '{key}' has no assistant turn, so there is nothing to learn. Add "
                        "the answer the model should give.")
    return messages


def normalize(row: Mapping, number: int) -> list[dict] | str:
    """Chat messages for a conversational row, or the raw string for a plain ``text`` row.

    ``number`` is the 1-based row number used in error messages.
    """
    if "messages" in row:
        return _chat(row["messages"], number, "messages", "role", "content")
    if "conversations" in row:
        return _chat(row["conversations"], number, "conversations", "from", "value")
    if "instruction" in row or "output" in row:
        instruction = _text(_field(row, number, "instruction", "Alpaca"), number, "instruction")
        output = _text(_field(row, number, "output", "Alpaca"), number, "output")
        extra = _text(row.get("input") or "", number, "input")
        messages = [{"role": "system", "content": _text(row["system"], number, "system")}] if row.get("system") \
            else []
        messages.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
        messages.append({"role": "assistant", "content": output})
        return messages
    if "text" in row:
        return _text(row["text"], number, "text")
    raise UserError(f"Row {number} has none of the fields 'messages', 'conversations', 'instruction'/'output' or "
                    f"'text' (it has: {', '.join(map(str, row)) or 'nothing'}). Fix: use one shape for every row.")
