"""Every command crossed with every corruption of every file it reads: exit 1 with a message that names the file
and the fix, no traceback, no finished-looking output, no empty folder left behind, the user's files untouched.

The corrupted inputs are copies of a tiny fixture (Llama-3 BPE tokenizer), its adapter and its GGUFs; each case
breaks one file in one way and runs one command through the real command line (in process, as a user's shell
would, with the same exit status)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from lora_helpers import make_adapter

from unsloth_nb.__main__ import main
from unsloth_nb.gguf import convert

Corrupt = Callable[[Path], None]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, len(data) // 2)])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("a folder where a file belongs")


def _json_list(path: Path) -> None:
    path.write_text("[1, 2, 3]")


def _edit_json(**changes: object) -> Corrupt:
    def edit(path: Path) -> None:
        data = json.loads(path.read_text(encoding="utf-8"))
        for key, value in changes.items():
            if value is _DELETE:
                data.pop(key, None)
            else:
                data[key] = value
        path.write_text(json.dumps(data), encoding="utf-8")
    return edit


_DELETE = object()


def _safetensors_header(edit: Callable[[dict], None]) -> Corrupt:
    """Rewrite a safetensors file's JSON header (the data stays)."""
    def corrupt(path: Path) -> None:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        edit(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return corrupt


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def _bad_dtype(header: dict) -> None:
    _first_tensor(header)["dtype"] = "Q9"


def _bad_shape(header: dict) -> None:
    _first_tensor(header)["shape"] = [3, 7]


def _huge_length(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])


def _gguf_magic(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[:4] = b"GGUX"
    path.write_bytes(bytes(raw))


def _gguf_huge_count(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack("<Q", 1 << 40)  # key/value count
    path.write_bytes(bytes(raw))


def _binary(path: Path) -> None:
    path.write_bytes(b"\xff\xfe\x00\x81" * 1000)


COMMON: dict[str, Corrupt] = {"truncated": _truncate, "empty": _empty, "garbage": _garbage, "a folder": _folder}
JSON: dict[str, Corrupt] = {**COMMON, "a JSON list": _json_list}

FILES: dict[str, tuple[str, str, dict[str, Corrupt]]] = {
    # file id: (what holds it, its name, corruptions)
    "config": ("model", "config.json", {**JSON, "no architecture": _edit_json(architectures=_DELETE,
                                                                              model_type=_DELETE),
                                        "layers not a number": _edit_json(num_hidden_layers="many")}),
    "tokenizer": ("model", "tokenizer.json", {**JSON, "no model section": _edit_json(model=_DELETE),
                                              "added_tokens not a list": _edit_json(added_tokens={"a": 1})}),
    "tokenizer_config": ("model", "tokenizer_config.json", {**JSON, "broken chat template": _edit_json(
        chat_template="{% for m in messages %}{{ m.content }")}),
    "weights": ("model", "model.safetensors", {**COMMON, "unknown dtype": _safetensors_header(_bad_dtype),
                                               "shape that does not match its data": _safetensors_header(_bad_shape),
                                               "header length of 2^40": _huge_length}),
    "adapter_config": ("adapter", "adapter_config.json", {**JSON, "negative rank": _edit_json(r=-4),
                                                          "alpha not a number": _edit_json(lora_alpha="big")}),
    "adapter_weights": ("adapter", "adapter_model.safetensors", {**COMMON,
                                                                  "unknown dtype": _safetensors_header(_bad_dtype)}),
    "gguf": ("gguf", "model.BF16.gguf", {**COMMON, "wrong magic": _gguf_magic, "2^40 key/values": _gguf_huge_count}),
    "data": ("data", "data.jsonl", {"binary": _binary, "not JSON": lambda p: p.write_text("{not json\n"),
                                    "a JSON list per line": lambda p: p.write_text("[1, 2]\n"),
                                    "a folder": _folder, "empty": _empty}),
}

OUT = "OUT"
COMMANDS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    # command id: (argv with placeholders, the file ids it reads)
    "plan": (["plan", "{model}", "--quant", "q4_k_m", "--out", OUT], ("config", "tokenizer", "tokenizer_config",
                                                                      "weights")),
    "train": (["train", "--model", "{model}", "--data", "{data}", "--out", OUT, "--max-steps", "1"],
              ("config", "tokenizer", "tokenizer_config", "weights", "data")),
    "merge": (["merge", "--base", "{model}", "--adapter", "{adapter}", "--out", OUT],
              ("config", "tokenizer", "tokenizer_config", "weights", "adapter_config", "adapter_weights")),
    "gguf": (["gguf", "{model}", "--quant", "q8_0", "--out", OUT], ("config", "tokenizer", "tokenizer_config",
                                                                   "weights")),
    "gguf --adapter": (["gguf", "{model}", "--adapter", "{adapter}", "--quant", "q8_0", "--out", OUT],
                       ("config", "tokenizer", "weights", "adapter_config", "adapter_weights")),
    "requantize": (["gguf", "{gguf}", "--quant", "q4_k_m", "--out", OUT], ("gguf",)),
    "verify": (["verify", "{model}", "{gguf}", "--adapter", "{adapter}"],
               ("config", "tokenizer", "tokenizer_config", "weights", "adapter_config", "adapter_weights", "gguf")),
    "serve gguf": (["serve", "{gguf}", "--engine", "llama.cpp"], ("gguf",)),
    "serve folder": (["serve", "{model}", "--engine", "vllm"], ("config", "tokenizer", "tokenizer_config",
                                                                "weights")),
}

CASES = [(command, file, corruption) for command, (_, reads) in COMMANDS.items() for file in reads
         for corruption in FILES[file][2]]


@pytest.fixture(scope="module")
def pristine(llama3_dir, tmp_path_factory) -> dict[str, Path]:
    """The uncorrupted inputs: the fixture model, an adapter, a BF16 GGUF and a small dataset."""
    root = tmp_path_factory.mktemp("pristine")
    model = root / "model"
    shutil.copytree(llama3_dir, model)
    adapter = make_adapter(model, root / "adapter")
    gguf_dir = root / "gguf"
    gguf_dir.mkdir()
    bf16 = convert.convert(model, ["bf16"], root / "gguf-out", progress=False)[0].path
    shutil.copy(bf16, gguf_dir / "model.BF16.gguf")
    data = root / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."}]}
            for i in range(4)]
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model, "adapter": adapter, "gguf": gguf_dir, "data": data}


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[" | ".join(c) for c in CASES])
def test_a_broken_file_gives_one_clear_error(case, pristine, tmp_path, capsys, ledger) -> None:
    command, file_id, corruption = case
    holder, name, corruptions = FILES[file_id]
    world = {}
    for key, source in pristine.items():
        world[key] = tmp_path / key
        shutil.copytree(source, world[key], symlinks=False)
    corruptions[corruption](world[holder] / name)
    before = {key: _hashes(folder) for key, folder in world.items()}
    out = tmp_path / "out"
    paths = {"model": world["model"], "adapter": world["adapter"], "gguf": world["gguf"] / "model.BF16.gguf",
             "data": world["data"] / "data.jsonl"}
    argv = [str(out) if a == OUT else a.format(**paths) for a in COMMANDS[command][0]]
    ledger["cases"] += 1
    if command.startswith("serve"):  # a server that starts after all would serve until stopped: a child with a limit
        done = subprocess.run([sys.executable, "-m", "unsloth_nb", *argv], capture_output=True, text=True,
                              timeout=300)
        status, err = done.returncode, done.stderr.strip()
    else:
        status = main(argv)
        err = capsys.readouterr().err.strip()
    assert status == 1, f"exit {status}: {err[-3000:]}"
    assert err.startswith("error: ") and "Traceback" not in err, err[-3000:]
    assert re.search(r"\bFix\b", err), err
    assert name in err or str(world[holder] / name) in err or holder in err, f"the file is not named: {err}"
    assert not out.exists(), f"output left behind: {list(out.rglob('*')) if out.is_dir() else out}"
    for key, folder in world.items():
        after = _hashes(folder)
        lost = [f for f, digest in before[key].items() if after.get(f) != digest]
        ledger["files checked"] += len(before[key])
        ledger["files lost"] += len(lost)
        assert not lost, lost
        extra = sorted(set(after) - set(before[key]))
        assert not extra, f"new files among the user's: {extra}"


def test_the_matrix_is_large() -> None:
    assert len(CASES) >= 80
