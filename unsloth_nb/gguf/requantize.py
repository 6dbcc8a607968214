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
from unsloth_nb.gguf import header, imatrix_file, layout, output, quants, recipes
from unsloth_nb.gguf.layout import GGUFLayout, TensorLayout
from unsloth_nb.gguf.output import ConvertResult

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


def _read(source: Path) -> _Source:
    """The source GGUF's header, checked (``header.require``), and refused where requantizing it would be wrong."""
    head = header.require(source)
    align = int(head.values.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT))
    if align != layout.ALIGNMENT:
        raise UserError(f"{source} aligns its data to {align} bytes, not GGUF's usual {layout.ALIGNMENT}. "
                        "Fix: convert the HF folder instead.")
    parsed = _Source(source, head.entries, head.values, head.tensors, layout.aligned(head.end))
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


def _head(source: _Source, method: recipes.Method, types: list[T],
          extra: dict[str, gguf.GGUFValue] | None = None) -> tuple[bytes, list[int]]:
    """The new file's header (as GGUFWriter would write the source's key/values, architecture first, with
    ``general.file_type`` set for ``method``, then the ``extra`` key/values, and the new tensor infos) and each
    tensor's data offset, plus the data section's size as a last entry."""
    entries = dict(source.entries)
    for key, value in (extra or {}).items():
        entries.pop(key, None)
        entries[key] = _pack_string(key) + layout.pack_value(value.value, value.type)
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
        offset += layout.aligned(layout.nbytes(t.shape, qtype))
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
               overwrite: bool = False, imatrix: str | os.PathLike[str] | None = None) -> list[ConvertResult]:
    """Write ``out_dir/<name>.<METHOD>.gguf`` for every method from the 16/32-bit GGUF ``source``, in one pass.

    ``imatrix`` (a GGUF or legacy .dat importance matrix) weights the quantizers as ``llama-quantize --imatrix``
    does, with its type mix and its ``quantize.imatrix.*`` keys."""
    if not methods:
        raise UserError("No GGUF method given. Fix: pass at least one, e.g. --quant q4_k_m.")
    src = Path(source).expanduser()
    reader = _read(src)
    weights = imatrix_file.load(imatrix) if imatrix is not None else None
    resolved = list({m.name: m for m in (recipes.resolve(x) if isinstance(x, str) else x for x in methods)}.values())
    out = Path(out_dir).expanduser()
    created = output.check_out_dir(out)
    try:
        return _requantize(reader, src, resolved, out, device, progress, check_space, overwrite,
                           weights, None if imatrix is None else Path(imatrix))
    except BaseException:
        output.remove_if_empty(out, created)
        raise


def _requantize(reader: _Source, src: Path, resolved: list[recipes.Method], out: Path, device: str | None,
                progress: bool, check_space: bool, overwrite: bool, imatrix: imatrix_file.Imatrix | None,
                imatrix_path: Path | None) -> list[ConvertResult]:
    shape = _model_shape(reader)
    started = time.perf_counter()
    with_imatrix = imatrix is not None
    types = [[recipes.tensor_type(m, t.name, t.shape, shape, with_imatrix) for t in reader.tensors]
             for m in resolved]
    weights = [[imatrix.for_tensor(t.name, qtype, t.shape) if imatrix is not None else None
                for t, qtype in zip(reader.tensors, mtypes, strict=True)] for mtypes in types]
    extra = imatrix.quantize_metadata(str(imatrix_path)) if imatrix is not None else None
    heads, layouts = [], []
    for m, mtypes in zip(resolved, types, strict=True):
        head, offsets = _head(reader, m, mtypes, extra if m.quantized else None)
        data = layout.aligned(len(head))
        tensors = tuple(TensorLayout(t.name, t.shape, qtype, layout.nbytes(t.shape, qtype), data + offset, 0)
                        for t, qtype, offset in zip(reader.tensors, mtypes, offsets[:-1], strict=True))
        end = data + offsets[-1]
        name = _out_name(src, m)
        heads.append(head)
        layouts.append(GGUFLayout(m.name, name, end, data, tensors, ((name, end),)))
    finals = [out / lay.file_name for lay in layouts]
    sources = [src] if imatrix_path is None else [src, imatrix_path]
    inputs = [manifest.fingerprint(sources, method=m.name, source="gguf") for m in resolved]
    done = output.reusable([[f] for f in finals], inputs, out, overwrite)
    todo = [i for i in range(len(resolved)) if not done[i]]
    output.remove_stale(out, [finals[i] for i in todo])
    need = sum(layouts[i].size for i in todo)
    if check_space and todo:
        output.check_space(out, need)
    free_before = shutil.disk_usage(out).free
    temps = {i: output.temporary(finals[i]) for i in todo}
    try:
        if todo:
            digests = _write(reader, {i: (temps[i], heads[i], types[i], weights[i]) for i in todo}, device, progress)
            for i in todo:
                output.commit(out, [finals[i]], [temps[i]], layouts[i], [heads[i]], [digests[i]], inputs[i])
    except OSError as exc:
        raise output.write_error(exc, out, need, free_before) from exc
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return [ConvertResult(m.name, finals[i], finals[i].stat().st_size, 0.0 if done[i] else seconds,
                          len(reader.tensors), (finals[i],), reused=done[i]) for i, m in enumerate(resolved)]


def _write(reader: _Source, jobs: dict[int, tuple[Path, bytes, list[T], list[np.ndarray | None]]],
           device: str | None,
           progress: bool) -> dict[int, str]:
    """Stream every source tensor once into all the files; returns each file's sha256."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(int(np.prod(t.shape)) for t in reader.tensors), unit="param", unit_scale=True,
                   desc="GGUF requantize", leave=False)
    chunk = layout.CHUNK_ELEMENTS * (layout.GPU_CHUNK_FACTOR if (device or quants.default_device()) != "cpu" else 1)
    data = np.memmap(reader.path, dtype=np.uint8, mode="r")
    order = list(jobs)
    files = output.Files([[jobs[i][0]] for i in order], [[jobs[i][1]] for i in order])
    try:
        for k, t in enumerate(reader.tensors):
            files.begin_tensor([0] * len(order))
            for rows in layout.row_chunks(t.shape, chunk):
                x = _rows(data, reader.data + t.offset, t, rows)
                for n, i in enumerate(order):
                    data_bytes = np.ascontiguousarray(quants.encode(x, jobs[i][2][k], device, weights=jobs[i][3][k]))
                    files.write(n, 0, memoryview(data_bytes).cast("B"))
                if bar is not None:
                    bar.update(x.numel())
        return {i: digests[0] for i, digests in zip(order, files.close(), strict=True)}
    finally:
        del data
        if bar is not None:
            bar.close()
        files.abort()
