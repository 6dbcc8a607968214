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
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from unsloth_nb import manifest
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import recipes
from unsloth_nb.gguf.convert import (
    CHUNK_ELEMENTS,
    ConvertResult,
    GGUFLayout,
    TensorLayout,
    Writer,
    _check_out_dir,
    _check_space,
    _encode,
    _nbytes,
    _pad,
    _reusable,
    _serialize,
    _validate,
    _write_error,
    resolve_method,
)

T = gguf.GGMLQuantizationType
SOURCE_TYPES = (T.F32, T.F16, T.BF16)
"""Tensor types a source file may hold: quantizing already-quantized weights again compounds the error."""


def _read(source: Path) -> gguf.GGUFReader:
    if not source.is_file():
        raise UserError(f"The GGUF file {source} does not exist. Fix: pass the path of an f16, bf16 or f32 "
                        ".gguf file.")
    try:
        reader = gguf.GGUFReader(source)
    except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError... on a damaged file
        raise UserError(f"{source} is not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]}). It may be "
                        "truncated. Fix: download or export it again.") from None
    if int(_value(reader, gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1)) > 1:
        raise UserError(f"{source} is one shard of a split GGUF. Fix: join the shards first (llama.cpp's "
                        "gguf-split --merge), or convert the HF folder instead.")
    quantized = [t for t in reader.tensors if t.tensor_type not in SOURCE_TYPES]
    if quantized:
        t = quantized[0]
        raise UserError(f"{source} already holds quantized tensors ({t.name} is {T(t.tensor_type).name}); "
                        "quantizing twice loses quality. Fix: start from the f16/bf16/f32 GGUF, or convert the HF "
                        "folder directly.")
    return reader


def _value(reader: gguf.GGUFReader, key: str, default: object = None) -> object:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _model_shape(reader: gguf.GGUFReader, arch: str) -> recipes.ModelShape:
    n_head = int(_value(reader, f"{arch}.attention.head_count", 0) or 0)
    return recipes.ModelShape(
        n_layer=int(_value(reader, f"{arch}.block_count", 0) or 0),
        n_head=n_head,
        n_head_kv=int(_value(reader, f"{arch}.attention.head_count_kv", n_head) or n_head),
        has_output=any(t.name == "output.weight" for t in reader.tensors),
    )


def _shape(t: gguf.gguf_reader.ReaderTensor) -> tuple[int, ...]:
    """Torch-order shape (GGUF stores dimensions fastest-first)."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _writer(reader: gguf.GGUFReader, arch: str, method: recipes.Method, types: list[T]) -> Writer:
    """Key/values copied in the source's order (file type set for ``method``) and the new tensor infos."""
    writer = Writer(None, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        value = int(method.file_type) if name == gguf.Keys.General.FILE_TYPE else field.contents()
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(name, value, vtype, sub_type=sub)
    for t, qtype in zip(reader.tensors, types, strict=True):
        shape = _shape(t)
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    return writer


def _rows(t: gguf.gguf_reader.ReaderTensor, rows: slice) -> torch.Tensor:
    """float32 rows of a source tensor (exact: f16 and bf16 widen without rounding)."""
    shape = _shape(t)
    data = np.asarray(t.data)
    if t.tensor_type == T.BF16:
        data = data.view(np.int16)  # gguf-py hands BF16 over as raw bytes
    x = torch.from_numpy(np.array(data.reshape(shape)[rows]))  # a writable copy of just these rows
    return x.view(torch.bfloat16).float() if t.tensor_type == T.BF16 else x.float()


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
    arch = str(_value(reader, gguf.Keys.General.ARCHITECTURE, "llama"))
    shape = _model_shape(reader, arch)
    out = Path(out_dir).expanduser()
    _check_out_dir(out)
    started = time.perf_counter()
    types = [[recipes.tensor_type(m, t.name, _shape(t), shape) for t in reader.tensors] for m in resolved]
    heads, layouts = [], []
    for m, mtypes in zip(resolved, types, strict=True):
        writer = _writer(reader, arch, m, mtypes)
        (head,) = _serialize(writer)
        align = writer.data_alignment
        end = gguf.GGUFWriter.ggml_pad(len(head), align)
        tensors = []
        for t, qtype in zip(reader.tensors, mtypes, strict=True):
            nbytes = _nbytes(_shape(t), qtype)
            tensors.append(TensorLayout(t.name, _shape(t), qtype, nbytes, end, 0))
            end += gguf.GGUFWriter.ggml_pad(nbytes, align)
        name = _out_name(src, m)
        heads.append(head)
        layouts.append(GGUFLayout(m.name, name, end, gguf.GGUFWriter.ggml_pad(len(head), align), tuple(tensors),
                                  ((name, end),)))
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


def _write(reader: gguf.GGUFReader, jobs: dict[int, tuple[Path, bytes, list[T]]], device: str | None,
           progress: bool) -> dict[int, str]:
    """Stream every source tensor once into all the files; returns each file's sha256."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(int(t.n_elements) for t in reader.tensors), unit="param", unit_scale=True,
                   desc="GGUF requantize", leave=False)
    files = {i: manifest.HashingFile(path) for i, (path, _, _) in jobs.items()}
    try:
        for i, (_, head, _) in jobs.items():
            files[i].write(head)
        for k, t in enumerate(reader.tensors):
            shape = _shape(t)
            for f in files.values():
                _pad(f)
            chunks = [slice(None)]
            if len(shape) > 1:
                step = max(1, CHUNK_ELEMENTS // max(int(np.prod(shape[1:])), 1))
                chunks = [slice(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]
            for rows in chunks:
                x = _rows(t, rows)
                for i, (_, _, types) in jobs.items():
                    files[i].write(memoryview(np.ascontiguousarray(_encode(x, types[k], device))).cast("B"))
                if bar is not None:
                    bar.update(x.numel())
        for f in files.values():
            _pad(f)
            f.close()
        return {i: f.hexdigest() for i, f in files.items()}
    finally:
        if bar is not None:
            bar.close()
        for f in files.values():
            f.close()
