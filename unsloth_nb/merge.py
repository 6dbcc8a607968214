"""Streaming merge of a LoRA adapter into its 16-bit base, one tensor in memory at a time.

peft's ``merge_and_unload()`` + ``save_pretrained()`` holds the whole model (often twice); here each base
tensor comes merged from ``checkpoint.MergedModel`` (``W + scaling * (B @ A)`` in float32, cast back to the
base dtype) and is streamed into the output shard. The GGUF writer reads the same merged view directly (the
fused path: no merged copy on disk). This module is the writer: shards, index, side files, atomic rename.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from unsloth_nb import manifest
from unsloth_nb import plan as planner
from unsloth_nb.checkpoint import DTYPES, TOKENIZER_FILES, MergedModel
from unsloth_nb.errors import UserError


@dataclass
class MergeSettings:
    """How to merge (all fields have safe defaults)."""

    max_shard_size: int = 5 * 10**9
    """Largest output shard in bytes (safetensors files are split above it, with an index); the command line
    takes sizes such as "5GB" (5 * 10^9 bytes, as transformers reads it)."""
    device: str | None = None
    """Where the B @ A products are computed: "cuda" when a GPU is present, else "cpu"."""
    progress: bool = True
    """Show a tqdm progress bar over tensors."""
    plan: bool = True
    """Ask the planner first and refuse before writing when RAM or disk cannot fit (off only to test faults)."""
    overwrite: bool = False
    """Replace an existing, non-empty output folder (never done unasked; a complete merge of the same inputs
    is reused without this)."""


def _plan_shards(shapes: dict[str, tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, (dtype, shape) in shapes.items():
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class SafetensorsStreamWriter:
    """Writes a safetensors file tensor by tensor: the header is known up front, data follows in order."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * DTYPES[dtype][0]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.expected = [name for name, _, _ in entries]
        self.handle = manifest.HashingFile(path)
        self.handle.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor) -> None:
        import torch

        if name != self.expected[0]:
            raise RuntimeError(f"tensors out of order: got {name}, expected {self.expected[0]}")
        self.expected.pop(0)
        data = tensor.contiguous().cpu()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        self.handle.write(memoryview(data.numpy()).cast("B"))

    def close(self) -> str:
        """Flush and close; returns the file's sha256."""
        self.handle.close()
        return self.handle.hexdigest()


@dataclass
class MergeResult:
    """What a merge wrote."""

    out_dir: Path
    shards: list[Path]
    total_bytes: int
    seconds: float
    reused: bool = False
    """True when ``out_dir`` already held a complete merge of the same inputs, which was kept."""

    def __str__(self) -> str:
        took = "complete from an earlier run, kept" if self.reused else f"{self.seconds:.1f} s"
        return f"merged model: {self.out_dir} ({len(self.shards)} shard(s), {self.total_bytes / 1e9:.2f} GB, {took})"


def merge(base: str | Path, adapter: str | Path, out_dir: str | Path,
          settings: MergeSettings | None = None) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write a 16-bit HF folder at ``out_dir``, one tensor at a time."""
    from tqdm.auto import tqdm

    settings = settings or MergeSettings()
    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    model = MergedModel(Path(base), Path(adapter), settings.device)
    assert model.adapter is not None
    if not (model.adapter.pairs or model.adapter.replacements or model.adapter.token_deltas):
        raise UserError(f"{adapter} holds no LoRA weights, so a merge would only copy the base. Fix: pass the "
                        "adapter folder that training wrote.")
    shards = _plan_shards(model.shapes, settings.max_shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(model.shapes_nbytes(n) for n in model.shapes)
    inputs = manifest.fingerprint(model.input_files(), max_shard_size=settings.max_shard_size)
    if _complete(out_dir, inputs):
        return MergeResult(out_dir, [out_dir / n for n in names], total, 0.0, reused=True)
    _check_output(out_dir, [model.base_dir.resolve(), model.adapter.path.resolve()], settings.overwrite)
    if settings.plan:
        planner.make_plan(base, [], adapter=adapter, merged_out=out_dir, device=settings.device).require()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    manifest.remove_stale(out_dir.parent, re.escape(f".{out_dir.name}.") + r"(partial|old)-(?P<pid>\d+)")
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    partial.mkdir()
    free_before = shutil.disk_usage(partial).free
    try:
        bar = tqdm(total=len(model.shapes), desc="merge", unit="tensor", disable=not settings.progress)
        written: dict[str, tuple[int, str]] = {}
        for shard_name, members in zip(names, shards, strict=True):
            entries = [(n, *model.shapes[n]) for n in members]
            writer = SafetensorsStreamWriter(partial / shard_name, entries)
            try:
                for name in members:
                    tensor = model.get(name)
                    writer.write(name, tensor)
                    del tensor
                    bar.update(1)
            finally:
                digest = writer.close()
            written[shard_name] = ((partial / shard_name).stat().st_size, digest)
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for f, members in zip(names, shards, strict=True) for n in members}}
            (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _copy_side_files(model, partial)
        for path in partial.iterdir():
            if path.name not in written:
                written[path.name] = (path.stat().st_size, manifest.sha256_file(path))
        manifest.record(partial, written, inputs)
        _swap_in(partial, out_dir)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"Disk full: the merged model needs about {total / 1e9:.2f} GB in {out_dir.parent}, "
                            f"which had {free_before / 1e9:.2f} GB free ({max(total - free_before, 0) / 1e9:.2f} GB "
                            "more needed); nothing was left under the output name and earlier files are intact. "
                            "Fix: free that much space, choose another --out folder, or skip the merged copy with "
                            "the fused path (`gguf BASE --adapter ADAPTER`).") from exc
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return MergeResult(out_dir, [out_dir / n for n in names], total, time.perf_counter() - started)


def _complete(out_dir: Path, inputs: str) -> bool:
    """True when ``out_dir`` holds a merge of the same inputs whose every recorded file checks out."""
    recorded = manifest.load(out_dir)
    return bool(recorded) and all(manifest.status(out_dir, name, inputs) == "complete" for name in recorded)


def _swap_in(partial: Path, out_dir: Path) -> None:
    """Put the finished folder under its final name in one rename (an old folder is replaced only when asked)."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out_dir.exists():
        out_dir.rmdir()  # _check_output allowed only an empty folder here
    os.replace(partial, out_dir)


def _check_output(out_dir: Path, inputs: list[Path], overwrite: bool = False) -> None:
    for source in inputs:
        if out_dir == source or source in out_dir.parents or out_dir in source.parents:
            raise UserError(f"The output folder {out_dir} overlaps the input folder {source}; writing there would "
                            "mix the merged model with its inputs. Fix: choose an output folder outside it.")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"The output path {out_dir} is a file, not a folder. Fix: choose a new folder name.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        what = ("a merge of other inputs (the adapter or base changed since)" if manifest.load(out_dir)
                else "files unsloth_nb did not write")
        raise UserError(f"The output folder {out_dir} already exists and holds {what}; unsloth_nb never overwrites "
                        "your files unasked. Fix: choose a new folder, delete the old one yourself, or pass "
                        "overwrite=True (MergeSettings) to replace it.")
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"Cannot write to {parent} (permission denied). Fix: choose an output folder you can write.")


def _copy_side_files(model: MergedModel, dest: Path) -> None:
    """config.json (cleaned), generation config, tokenizer and chat template next to the merged weights."""
    (dest / "config.json").write_text(json.dumps(model.merged_config(), indent=2) + "\n")
    generation = next((d / "generation_config.json" for d in (model.tokenizer_dir, model.base_dir)
                       if (d / "generation_config.json").is_file()), None)
    if generation is not None:
        shutil.copy2(generation, dest / "generation_config.json")
    for name in TOKENIZER_FILES:
        source = next((d / name for d in (model.tokenizer_dir, model.base_dir) if (d / name).is_file()), None)
        if source is not None:
            shutil.copy2(source, dest / name)


def run_cli(args: argparse.Namespace) -> int:
    from unsloth_nb import cli

    settings = cli.from_arguments(MergeSettings, args)
    result = merge(args.base, args.adapter, args.out, settings)
    print(result)
    return 0
