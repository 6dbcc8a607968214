"""Quantize an existing 16- or 32-bit GGUF file (``python -m unsloth_nb gguf FILE.gguf --quant q4_k_m``).

For users who already have an f16/bf16/f32 GGUF and no HF folder: every key/value is copied in order (only
``general.file_type`` changes), each tensor gets llama.cpp's type for the method (``recipes``), and the data
is streamed tensor by tensor through the same quantizers as the HF path. From a BF16 file made by ``convert``
the result is byte-identical to converting the HF folder directly. Files are written, checked, recorded and
renamed exactly as ``convert`` does (see ``manifest``).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from unsloth_nb import manifest
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import header, quants, recipes
from unsloth_nb.gguf.convert import (
    CHUNK_ELEMENTS,
    GPU_CHUNK_FACTOR,
    ConvertResult,
    GGUFLayout,
    TensorLayout,
    _check_out_dir,
    _check_space,
    _encode,
    _nbytes,
    _pad,
    _reusable,
    _validate,
    _write_error,
    resolve_method,
)

T = gguf.GGMLQuantizationType
SOURCE_TYPES = (T.F32, T.F16, T.BF16)
"""Tensor types a source file may hold: quantizing already-quantized weights again compounds the error."""


@dataclass(frozen=True)
class _Source:
    """A source GGUF's header (``gguf.header``: the key/value entries as stored, to be copied as they are, the
    scalar and string values, the tensor infos) and where its data section starts."""

    path: Path
    entries: dict[str, bytes]
    values: dict[str, Any]
    tensors: list[header.TensorInfo]
    data: int
    """File offset of the data section (tensor offsets count from here)."""

    @property
    def arch(self) -> str:
        return str(self.values.get(gguf.Keys.General.ARCHITECTURE, "llama"))


def _parse(path: Path) -> _Source:
    """The header of ``path``, checked: GGUF version 3, the usual alignment, every tensor inside the file."""
    head = header.read(path)
    if head.version != 3:
        raise ValueError(f"GGUF version {head.version}; this reads version 3")
    align = int(head.values.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT))
    if align != gguf.GGUF_DEFAULT_ALIGNMENT:
        raise UserError(f"{path} aligns its data to {align} bytes, not GGUF's usual {gguf.GGUF_DEFAULT_ALIGNMENT}. "
                        "Fix: convert the HF folder instead.")
    data = gguf.GGUFWriter.ggml_pad(head.end, align)
    ends = [data + t.offset + _nbytes(t.shape, T(t.qtype)) for t in head.tensors]
    if ends and max(ends) > head.size:
        raise EOFError(f"its tensors need {max(ends)} bytes but the file has {head.size}")
    return _Source(path, head.entries, head.values, head.tensors, data)


def _read(source: Path) -> _Source:
    if not source.is_file():
        raise UserError(f"The GGUF file {source} does not exist. Fix: pass the path of an f16, bf16 or f32 "
                        ".gguf file.")
    try:
        parsed = _parse(source)
    except (OSError, ValueError, EOFError, struct.error, UnicodeDecodeError) as exc:  # damaged or cut short
        raise UserError(f"{source} is not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]}). It may be "
                        "truncated. Fix: download or export it again.") from None
    if int(parsed.values.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1)) > 1:
        raise UserError(f"{source} is one shard of a split GGUF. Fix: join the shards first (llama.cpp's "
                        "gguf-split --merge), or convert the HF folder instead.")
    quantized = [t for t in parsed.tensors if t.qtype not in SOURCE_TYPES]
    if quantized:
        t = quantized[0]
        raise UserError(f"{source} already holds quantized tensors ({t.name} is {T(t.qtype).name}); "
                        "quantizing twice loses quality. Fix: start from the f16/bf16/f32 GGUF, or convert the HF "
                        "folder directly.")
    return parsed


def _model_shape(source: _Source) -> recipes.ModelShape:
    arch, values = source.arch, source.values
    n_head = int(values.get(f"{arch}.attention.head_count", 0) or 0)
    return recipes.ModelShape(
        n_layer=int(values.get(f"{arch}.block_count", 0) or 0),
        n_head=n_head,
        n_head_kv=int(values.get(f"{arch}.attention.head_count_kv", n_head) or n_head),
        has_output=any(t.name == "output.weight" for t in source.tensors),
    )


def _pack_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _head(source: _Source, method: recipes.Method, types: list[T]) -> tuple[bytes, list[int]]:
    """The new file's header (as GGUFWriter would write the source's key/values, architecture first, with
    ``general.file_type`` set for ``method``, and the new tensor infos) and each tensor's data offset, plus
    the data section's size as a last entry."""
    entries = dict(source.entries)
    arch_key, type_key = gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE
    first = entries.pop(arch_key, None) or (_pack_string(arch_key) + struct.pack("<I", header.STRING)
                                            + _pack_string(source.arch))
    if type_key in entries:
        vtype = struct.unpack_from("<I", entries[type_key], 8 + len(type_key.encode()))[0]
        entries[type_key] = (_pack_string(type_key) + struct.pack("<I", vtype)
                             + struct.pack(header.SCALAR_FORMATS[vtype], int(method.file_type)))
    parts = [struct.pack("<4sIQQ", b"GGUF", 3, len(source.tensors), len(entries) + 1), first, *entries.values()]
    offsets, offset = [], 0
    for t, qtype in zip(source.tensors, types, strict=True):
        parts += [_pack_string(t.name), struct.pack(f"<I{len(t.shape)}Q", len(t.shape), *reversed(t.shape)),
                  struct.pack("<IQ", int(qtype), offset)]
        offsets.append(offset)
        offset += gguf.GGUFWriter.ggml_pad(_nbytes(t.shape, qtype), gguf.GGUF_DEFAULT_ALIGNMENT)
    return b"".join(parts), [*offsets, offset]


_NUMPY = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.int16}


def _rows(data: np.memmap, start: int, t: header.TensorInfo, rows: slice) -> torch.Tensor:
    """Rows of a source tensor whose data starts at file offset ``start``, in its stored dtype (the quantizers
    widen 16-bit values exactly)."""
    view = np.ndarray(t.shape, dtype=_NUMPY[t.qtype], buffer=data, offset=start)
    x = torch.from_numpy(np.array(view[rows]))  # a writable copy of just these rows
    return x.view(torch.bfloat16) if t.qtype == T.BF16 else x


def _out_name(source: Path, method: recipes.Method) -> str:
    stem = re.sub(r"\.(F32|F16|BF16)$", "", source.name.removesuffix(".gguf"), flags=re.IGNORECASE)
    return f"{stem}.{method.label}.gguf"


def requantize(source: str | os.PathLike[str], methods: list[str], out_dir: str | os.PathLike[str], *,
               device: str | None = None, progress: bool = True, check_space: bool = True,
               overwrite: bool = False) -> list[ConvertResult]:
    """Write ``out_dir/<name>.<METHOD>.gguf`` for every method from the 16/32-bit GGUF ``source``, in one pass."""
    if not methods:
        raise UserError("No GGUF method given. Fix: pass at least one, e.g. --quant q4_k_m.")
    src = Path(source).expanduser()
    reader = _read(src)
    resolved = list({m.name: m for m in (resolve_method(x) if isinstance(x, str) else x for x in methods)}.values())
    shape = _model_shape(reader)
    out = Path(out_dir).expanduser()
    _check_out_dir(out)
    started = time.perf_counter()
    types = [[recipes.tensor_type(m, t.name, t.shape, shape) for t in reader.tensors] for m in resolved]
    heads, layouts = [], []
    for m, mtypes in zip(resolved, types, strict=True):
        head, offsets = _head(reader, m, mtypes)
        data = gguf.GGUFWriter.ggml_pad(len(head), gguf.GGUF_DEFAULT_ALIGNMENT)
        tensors = tuple(TensorLayout(t.name, t.shape, qtype, _nbytes(t.shape, qtype), data + offset, 0)
                        for t, qtype, offset in zip(reader.tensors, mtypes, offsets[:-1], strict=True))
        end = data + offsets[-1]
        name = _out_name(src, m)
        heads.append(head)
        layouts.append(GGUFLayout(m.name, name, end, data, tensors, ((name, end),)))
    finals = [out / lay.file_name for lay in layouts]
    inputs = [manifest.fingerprint([src], method=m.name, source="gguf") for m in resolved]
    done = _reusable([[f] for f in finals], inputs, out, overwrite)
    todo = [i for i in range(len(resolved)) if not done[i]]
    for i in todo:
        manifest.remove_stale(out, re.escape(finals[i].name) + r"\.tmp-(?P<pid>\d+)")
    need = sum(layouts[i].size for i in todo)
    if check_space and todo:
        _check_space(out, need)
    free_before = shutil.disk_usage(out).free
    temps = {i: finals[i].with_name(f"{finals[i].name}.tmp-{os.getpid()}") for i in todo}
    try:
        if todo:
            digests = _write(reader, {i: (temps[i], heads[i], types[i]) for i in todo}, device, progress)
            for i in todo:
                _validate(temps[i], layouts[i], 0, heads[i])
                manifest.record(out, {finals[i].name: (layouts[i].size, digests[i])}, inputs[i])
                os.replace(temps[i], finals[i])
    except OSError as exc:
        raise _write_error(exc, out, need, free_before) from exc
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return [ConvertResult(m.name, finals[i], finals[i].stat().st_size, 0.0 if done[i] else seconds,
                          len(reader.tensors), (finals[i],), reused=done[i]) for i, m in enumerate(resolved)]


def _write(reader: _Source, jobs: dict[int, tuple[Path, bytes, list[T]]], device: str | None,
           progress: bool) -> dict[int, str]:
    """Stream every source tensor once into all the files; returns each file's sha256."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(int(np.prod(t.shape)) for t in reader.tensors), unit="param", unit_scale=True,
                   desc="GGUF requantize", leave=False)
    chunk = CHUNK_ELEMENTS * (GPU_CHUNK_FACTOR if (device or quants.default_device()) != "cpu" else 1)
    data = np.memmap(reader.path, dtype=np.uint8, mode="r")
    files = {i: manifest.HashingFile(path) for i, (path, _, _) in jobs.items()}
    try:
        for i, (_, head, _) in jobs.items():
            files[i].write(head)
        for k, t in enumerate(reader.tensors):
            for f in files.values():
                _pad(f)
            chunks = [slice(None)]
            if len(t.shape) > 1:
                step = max(1, chunk // max(int(np.prod(t.shape[1:])), 1))
                chunks = [slice(r, min(r + step, t.shape[0])) for r in range(0, t.shape[0], step)]
            for rows in chunks:
                x = _rows(data, reader.data + t.offset, t, rows)
                for i, (_, _, types) in jobs.items():
                    files[i].write(memoryview(np.ascontiguousarray(_encode(x, types[k], device))).cast("B"))
                if bar is not None:
                    bar.update(x.numel())
        for f in files.values():
            _pad(f)
            f.close()
        return {i: f.hexdigest() for i, f in files.items()}
    finally:
        del data
        if bar is not None:
            bar.close()
        for f in files.values():
            f.close()
