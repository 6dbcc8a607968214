"""Faults, interruptions and bad input lose nothing (real processes, real small filesystems).

Every test counts what it tried in the ``ledger`` (bad-input cases, faults injected, user files checked and
lost); the run prints the totals at the end (see conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lora_helpers import make_adapter, other_base

from unsloth_nb import manifest
from unsloth_nb.__main__ import main
from unsloth_nb.dataset import DEMO_DATA
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import convert
from unsloth_nb.merge import MergeSettings, merge
from unsloth_nb.runtime import parse_size

KILL_SEEDS = [0, 1, 2, 3]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative names)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_kept(before: dict[str, str], folder: Path, ledger) -> None:
    """Every file in ``before`` is still there with the same bytes; counts checked and lost files."""
    after = snapshot(folder)
    lost = [name for name, digest in before.items() if after.get(name) != digest]
    ledger["files checked"] += len(before)
    ledger["files lost"] += len(lost)
    assert not lost, f"files lost or changed: {lost}"


@pytest.fixture(scope="module")
def adapter(llama2_dir, tmp_path_factory) -> Path:
    return make_adapter(llama2_dir, tmp_path_factory.mktemp("adapter") / "adapter")


# ---------------------------------------------------------------- disk full, planner bypassed


def test_disk_full_during_gguf_export(llama2_dir, tmpfs, ledger):
    (q8,) = convert.file_layout(llama2_dir, "q8_0").shards
    disk = tmpfs(-(-(q8[1] + 4 * 2**20) // 2**20) * 2**20)  # room for the Q8_0 file only
    (disk / "notes.txt").write_text("the user's own file")
    convert.convert(llama2_dir, ["q8_0"], disk, progress=False)
    before = snapshot(disk)

    with pytest.raises(UserError) as info:
        convert.convert(llama2_dir, ["bf16"], disk, progress=False, check_space=False)
    ledger["fault: disk full (gguf)"] += 1
    message = str(info.value)
    assert message.startswith("Disk full") and str(disk) in message and "more needed" in message
    assert "\n" not in message
    assert sorted(p.name for p in disk.iterdir()) == sorted(before)  # no BF16 file, no temporary left
    check_kept(before, disk, ledger)


def test_disk_full_during_merge(llama2_dir, adapter, tmpfs, ledger):
    disk = tmpfs(30 * 2**20)  # the merged model needs about 37 MB
    (disk / "earlier").mkdir()
    (disk / "earlier" / "weights.bin").write_bytes(os.urandom(2**20))
    before = snapshot(disk)

    with pytest.raises(UserError) as info:
        merge(llama2_dir, adapter, disk / "merged", MergeSettings(progress=False, plan=False))
    ledger["fault: disk full (merge)"] += 1
    message = str(info.value)
    assert message.startswith("Disk full") and str(disk) in message and "more needed" in message
    assert sorted(p.name for p in disk.iterdir()) == ["earlier"]  # no merged folder, no partial one
    check_kept(before, disk, ledger)


# ---------------------------------------------------------------- kill -9 at random points


def kill_during(cmd: list[str], started: Callable[[], bool], delay: float) -> bool:
    """Run ``cmd``; once ``started()`` (it is writing) wait ``delay`` s and SIGKILL it. True if it was killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.monotonic() + 300
    while not started() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert alive or proc.returncode == 0, err
    return alive


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_gguf_export_killed_then_rerun_is_byte_identical(llama2_dir, tmp_path, seed, ledger):
    methods = ["q8_0", "q4_k_m"]
    reference = {r.path.name: r.path.read_bytes()
                 for r in convert.convert(llama2_dir, methods, tmp_path / "ref", progress=False)}
    write_time = max(r.seconds for r in convert.convert(llama2_dir, methods, tmp_path / "ref2", progress=False))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)

    delay = random.Random(seed).uniform(0, write_time)
    cmd = [sys.executable, "-m", "unsloth_nb", "gguf", str(llama2_dir), "--quant", ",".join(methods), "--out", str(out)]
    if kill_during(cmd, lambda: any(".tmp-" in p.name for p in out.iterdir()), delay):
        ledger["fault: kill -9 (gguf)"] += 1
    for path in out.glob("*.gguf"):  # whatever carries a final name is complete
        assert path.read_bytes() == reference[path.name]

    results = convert.convert(llama2_dir, methods, out, progress=False)
    assert {r.path.name: r.path.read_bytes() for r in results} == reference
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    check_kept(before, out, ledger)


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_merge_killed_then_rerun_is_byte_identical(llama2_dir, adapter, tmp_path, seed, ledger):
    settings = MergeSettings(max_shard_size=parse_size("10MB"), progress=False)
    started = time.perf_counter()
    ref = merge(llama2_dir, adapter, tmp_path / "ref", settings)
    write_time = time.perf_counter() - started
    reference = snapshot(ref.out_dir)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("the user's own file")
    before = snapshot(work)
    out = work / "merged"

    delay = random.Random(seed).uniform(0, write_time)
    cmd = [sys.executable, "-m", "unsloth_nb", "merge", "--base", str(llama2_dir), "--adapter", str(adapter),
           "--out", str(out), "--max-shard-size", "10MB"]
    if kill_during(cmd, lambda: any(".partial-" in p.name for p in work.iterdir()), delay):
        ledger["fault: kill -9 (merge)"] += 1
    if out.exists():  # the folder appears in one rename, complete
        assert snapshot(out) == reference

    result = merge(llama2_dir, adapter, out, settings)
    assert snapshot(result.out_dir) == reference
    assert [p.name for p in work.iterdir() if p.name != "notes.txt"] == ["merged"]  # no partial folder left
    check_kept(before, work, ledger)


def test_incomplete_file_under_a_final_name_is_not_reused(llama2_dir, tmp_path, ledger):
    """A GGUF truncated or edited after it was written no longer matches its manifest record: never reused,
    never silently replaced."""
    (first,) = convert.convert(llama2_dir, ["q8_0"], tmp_path, progress=False)
    good = first.path.read_bytes()
    first.path.write_bytes(good[: len(good) // 2])
    ledger["fault: truncated output"] += 1
    with pytest.raises(UserError, match="--overwrite"):
        convert.convert(llama2_dir, ["q8_0"], tmp_path, progress=False)
    (again,) = convert.convert(llama2_dir, ["q8_0"], tmp_path, progress=False, overwrite=True)
    assert not again.reused and again.path.read_bytes() == good
    (kept,) = convert.convert(llama2_dir, ["q8_0"], tmp_path, progress=False)
    assert kept.reused


# ---------------------------------------------------------------- bad input: exit 1, one paragraph, no traceback


@pytest.fixture(scope="module")
def world(llama2_dir, adapter, tmp_path_factory) -> dict[str, Path]:
    """Inputs the bad-input cases start from; all of them must come out of the suite unchanged."""
    root = tmp_path_factory.mktemp("world")
    (gguf_file,) = convert.convert(llama2_dir, ["q8_0"], root / "gguf", progress=False)
    wrong_adapter = make_adapter(other_base(root, 128), root / "wrong_adapter")

    def copy_model(name: str, edit: Callable[[Path], None]) -> Path:
        folder = root / name
        shutil.copytree(llama2_dir, folder)
        edit(folder)
        return folder

    def truncate(folder: Path) -> None:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])

    def drop_layers(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        del config["num_hidden_layers"]
        (folder / "config.json").write_text(json.dumps(config))

    def other_arch(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
        (folder / "config.json").write_text(json.dumps(config))

    sharded = root / "sharded"
    merge(llama2_dir, adapter, sharded, MergeSettings(max_shard_size=parse_size("10MB"), progress=False))
    sorted(sharded.glob("model-*-of-*.safetensors"))[1].unlink()
    bad_json = root / "bad_json_adapter"
    shutil.copytree(adapter, bad_json)
    (bad_json / "adapter_config.json").write_text("{ not json")
    ia3 = root / "ia3_adapter"
    shutil.copytree(adapter, ia3)
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    taken = root / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("the user's own file")
    (root / "a_file.txt").write_text("not a folder")
    (root / "empty.jsonl").write_text("")
    (root / "bad_line.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                          '{"role": "assistant", "content": "hello"}]}\n{"messages": [\n')
    (root / "no_field.jsonl").write_text('{"prompt": "hi", "answer": "hello"}\n')
    (root / "empty_dir").mkdir()
    (root / "taken_gguf").mkdir()
    (root / "taken_gguf" / f"{llama2_dir.name}.Q8_0.gguf").write_text("the user's own file")
    return {
        "model": llama2_dir, "adapter": adapter, "gguf": gguf_file.path, "wrong_adapter": wrong_adapter,
        "truncated": copy_model("truncated", truncate), "no_layers": copy_model("no_layers", drop_layers),
        "gpt_neox": copy_model("gpt_neox", other_arch), "sharded": sharded, "bad_json": bad_json, "ia3": ia3,
        "taken": taken, "file": root / "a_file.txt", "empty": root / "empty.jsonl",
        "bad_line": root / "bad_line.jsonl", "no_field": root / "no_field.jsonl", "empty_dir": root / "empty_dir",
        "taken_gguf": root / "taken_gguf", "root": root,
    }


def busy_port() -> int:
    """A port something else listens on (kept open for the test session)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    BUSY.append(sock)
    return sock.getsockname()[1]


BUSY: list[socket.socket] = []
N = "/nonexistent/unsloth_nb/path"

# (id, argv built from the world's paths, what the message must name)
CASES: list[tuple[str, Callable[[dict], list[str]], str]] = [
    ("gguf: missing folder", lambda w: ["gguf", N, "--quant", "q8_0", "--out", f"{w['root']}/o"], "does not exist"),
    ("gguf: folder without config.json", lambda w: ["gguf", str(w["empty_dir"]), "--quant", "q8_0", "--out",
                                                    f"{w['root']}/o"], "config.json"),
    ("gguf: unsupported architecture", lambda w: ["gguf", str(w["gpt_neox"]), "--quant", "q8_0", "--out",
                                                  f"{w['root']}/o"], "GPTNeoX"),
    ("gguf: truncated safetensors", lambda w: ["gguf", str(w["truncated"]), "--quant", "q8_0", "--out",
                                               f"{w['root']}/o"], "model.safetensors"),
    ("gguf: config.json missing a field", lambda w: ["gguf", str(w["no_layers"]), "--quant", "q8_0", "--out",
                                                     f"{w['root']}/o"], "num_hidden_layers"),
    ("gguf: unknown method", lambda w: ["gguf", str(w["model"]), "--quant", "q4_km", "--out", f"{w['root']}/o"],
     "q4_k_m"),
    ("gguf: output under a file", lambda w: ["gguf", str(w["model"]), "--quant", "q8_0", "--out",
                                             f"{w['file']}/o"], "a_file.txt"),
    ("gguf: re-quantizing a quantized GGUF", lambda w: ["gguf", str(w["gguf"]), "--quant", "q4_k_m", "--out",
                                                        f"{w['root']}/o"], "already holds quantized tensors"),
    ("gguf: options a GGUF source cannot take", lambda w: ["gguf", str(w["gguf"]), "--quant", "q4_k_m", "--out",
                                                           f"{w['root']}/o", "--adapter", str(w["adapter"])],
     "HF folders only"),
    ("gguf: adapter with the llama.cpp backend", lambda w: ["gguf", str(w["model"]), "--quant", "q8_0", "--out",
                                                            f"{w['root']}/o", "--adapter", str(w["adapter"]),
                                                            "--backend", "llama.cpp"], "native backend"),
    ("gguf: bad split size", lambda w: ["gguf", str(w["model"]), "--quant", "q8_0", "--out", f"{w['root']}/o",
                                        "--split-max-size", "lots"], "split-max-size"),
    ("gguf: adapter for another base", lambda w: ["gguf", str(w["model"]), "--quant", "q8_0", "--out",
                                                  f"{w['root']}/o", "--adapter", str(w["wrong_adapter"])],
     "Shape mismatch"),
    ("gguf: same name held by a foreign file", lambda w: ["gguf", str(w["model"]), "--quant", "q8_0", "--out",
                                                          str(w["taken_gguf"])], "--overwrite"),
    ("merge: missing adapter", lambda w: ["merge", "--base", str(w["model"]), "--adapter", N, "--out",
                                          f"{w['root']}/o"], "does not exist"),
    ("merge: adapter for another base", lambda w: ["merge", "--base", str(w["model"]), "--adapter",
                                                   str(w["wrong_adapter"]), "--out", f"{w['root']}/o"],
     "Shape mismatch"),
    ("merge: base missing a shard", lambda w: ["merge", "--base", str(w["sharded"]), "--adapter", str(w["adapter"]),
                                               "--out", f"{w['root']}/o"], "missing shard"),
    ("merge: output inside the input", lambda w: ["merge", "--base", str(w["model"]), "--adapter",
                                                  str(w["adapter"]), "--out", f"{w['adapter']}/merged"], "overlaps"),
    ("merge: output folder taken", lambda w: ["merge", "--base", str(w["model"]), "--adapter", str(w["adapter"]),
                                              "--out", str(w["taken"])], "already exists"),
    ("merge: bad shard size", lambda w: ["merge", "--base", str(w["model"]), "--adapter", str(w["adapter"]),
                                         "--out", f"{w['root']}/o", "--max-shard-size", "huge"], "size"),
    ("merge: adapter_config.json not JSON", lambda w: ["merge", "--base", str(w["model"]), "--adapter",
                                                       str(w["bad_json"]), "--out", f"{w['root']}/o"], "JSON"),
    ("merge: not a LoRA adapter", lambda w: ["merge", "--base", str(w["model"]), "--adapter", str(w["ia3"]),
                                             "--out", f"{w['root']}/o"], "IA3"),
    ("merge: a GGUF given as the base", lambda w: ["merge", "--base", str(w["gguf"]), "--adapter", str(w["adapter"]),
                                                   "--out", f"{w['root']}/o"], "GGUF file"),
    ("plan: unknown method", lambda w: ["plan", str(w["model"]), "--quant", "q5_k_x"], "q5_k"),
    ("plan: missing model", lambda w: ["plan", N, "--quant", "q8_0"], N),
    ("serve: missing path", lambda w: ["serve", N], N),
    ("serve: busy port", lambda w: ["serve", str(w["gguf"]), "--port", str(busy_port())], "port"),
    ("serve: llama.cpp on a folder", lambda w: ["serve", str(w["model"]), "--engine", "llama.cpp"], "GGUF"),
    ("serve: a text file", lambda w: ["serve", str(w["file"])], "a_file.txt"),
    ("train: empty dataset", lambda w: ["train", "--model", str(w["model"]), "--data", str(w["empty"]), "--out",
                                        f"{w['root']}/o"], "empty"),
    ("train: malformed jsonl row", lambda w: ["train", "--model", str(w["model"]), "--data", str(w["bad_line"]),
                                              "--out", f"{w['root']}/o"], "Line 2"),
    ("train: row without a known field", lambda w: ["train", "--model", str(w["model"]), "--data",
                                                    str(w["no_field"]), "--out", f"{w['root']}/o"], "Row 1"),
    ("train: missing dataset", lambda w: ["train", "--model", str(w["model"]), "--data", N, "--out",
                                          f"{w['root']}/o"], N),
    ("train: zero steps", lambda w: ["train", "--model", str(w["model"]), "--data", str(w["bad_line"]), "--out",
                                     f"{w['root']}/o", "--max-steps", "0"], "max-steps"),
    ("train: output is a file", lambda w: ["train", "--model", str(w["model"]), "--data", str(DEMO_DATA),
                                           "--out", str(w["file"])], "a_file.txt"),
    ("verify: missing artifact", lambda w: ["verify", str(w["model"]), N], N),
    ("verify: a text file as artifact", lambda w: ["verify", str(w["model"]), str(w["file"])], "a_file.txt"),
    ("demo: folder is a file", lambda w: ["demo", "--dir", str(w["file"])], "a_file.txt"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_paragraph(case, world, capsys, ledger):
    name, argv, names = case
    before = snapshot(world["root"])
    model_before = snapshot(world["model"])
    ledger["cases"] += 1
    status = main([str(a) for a in argv(world)])
    err = capsys.readouterr().err.strip()
    assert status == 1, f"{name}: exit {status}\n{err}"
    assert err.startswith("error: ") and "Traceback" not in err
    assert "\n\n" not in err and len(err) < 1200, err
    assert re.search(r"\bFix\b|\bfix\b", err), f"{name}: the message does not say how to fix it: {err}"
    assert names in err, f"{name}: the message does not name {names!r}: {err}"
    check_kept(before, world["root"], ledger)
    check_kept(model_before, world["model"], ledger)
    assert not (world["root"] / "o").exists()


def test_bad_input_through_a_real_process_has_no_traceback(world):
    """The same path as a user's shell: exit status 1, the message on stderr, nothing else."""
    done = subprocess.run([sys.executable, "-m", "unsloth_nb", "gguf", str(world["model"]), "--quant", "q4_km",
                           "--out", str(world["root"] / "o")], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "q4_k_m" in done.stderr


def test_there_are_at_least_25_bad_input_cases():
    assert len(CASES) >= 25


def test_no_secret_in_notebooks():
    """Notebooks never carry a Hugging Face token (or any key) in their source or outputs."""
    for path in (Path(__file__).parents[1] / "notebooks").glob("*.ipynb"):
        text = path.read_text()
        assert not re.search(r"hf_[A-Za-z0-9]{30,}", text), path
        assert not re.search(r"(HF_TOKEN|api_key)\s*=\s*[\"'][^\"']{8,}", text), path


def test_hashing_file_flushing_in_the_background_keeps_bytes_and_checksum(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Background flushes every few bytes (while later pieces are written and hashed) change neither the
    file's bytes nor its sha256, and ``close`` leaves nothing unflushed behind."""
    monkeypatch.setattr(manifest.HashingFile, "WRITEBACK_BYTES", 1000)
    flushes: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (flushes.append(fd), real(fd))[1])
    pieces = [random.Random(i).randbytes(300 + 97 * i) for i in range(40)]
    f = manifest.HashingFile(tmp_path / "out.bin")
    for piece in pieces:
        f.write(memoryview(piece))
    f.close()
    data = b"".join(pieces)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert f.hexdigest() == hashlib.sha256(data).hexdigest()
    assert flushes, "no background flush ran"
