"""HF safetensors -> GGUF, natively in Python, one tensor at a time (``python -m unsloth_nb gguf``).

The model folder is read once: for each tensor, rows are loaded lazily from the safetensors files, turned into
float32, transformed as llama.cpp expects (q/k permutation for Llama) and fed to every requested output file,
each quantizing to its own type. Every file first gets all tensor infos and metadata (gguf-py's GGUFWriter),
then the data in the same order, so peak memory is about one tensor chunk, not the model.

Each file is written under a temporary name in the output folder, read back and checked (tensor count,
names, types, shapes, data offsets, size), and only then renamed to ``<name>.<METHOD>.gguf``.
The metadata and tensors follow llama.cpp's reference converter for the same model (see ``arch``, ``vocab``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import gc
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from unsloth_nb import manifest
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import arch as archs
from unsloth_nb.gguf import quants, recipes
from unsloth_nb.gguf import vocab as vocabs
from unsloth_nb.plan import read_header, resolve_model

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 22
"""Rows are read and quantized in chunks of at most this many elements (16 MiB as float32)."""
WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
"""Workers that read and encode chunks at the same time: threads (numpy, torch and file reads release the
GIL), or forked processes where the CPU quantizes K-quants (see ``_encoders``)."""
IN_FLIGHT = WORKERS + 2
"""Chunks read or encoded ahead of the writer at most: bounds memory to a few chunks."""
GPU_CHUNK_FACTOR = 4
"""On a GPU, chunks are this many times larger and two workers suffice: each chunk costs a fixed number of
kernel launches and host-device copies, so fewer, larger chunks are faster; two are read at a time."""
GPU_LOOKAHEAD_BYTES = 512 << 20
"""On a GPU, encoded chunks may wait for the writer up to this many bytes. The file's first byte can only be
written once the metadata (mostly the vocabulary, about a second) is built; meanwhile the GPU quantizes
ahead instead of idling after three chunks. About a second of a Q4_K_M export's output."""


@dataclass(frozen=True)
class ConvertResult:
    """One GGUF file written by ``convert``."""

    method: str
    """Method name as resolved, e.g. "q8_0"."""
    path: Path
    """Final path of the file."""
    size: int
    """File size in bytes."""
    seconds: float
    """Wall time of the conversion pass that wrote it (shared by all files of one call)."""
    tensors: int
    """Number of tensors in the file (in all shards when split)."""
    shards: tuple[Path, ...] = ()
    """Every file written for this method: ``(path,)`` unless split."""
    reused: bool = False
    """True when a complete file from the same inputs was already there (see ``manifest``) and was kept."""


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor lands in a GGUF file."""

    name: str
    """GGUF tensor name, e.g. "blk.0.attn_q.weight"."""
    shape: tuple[int, ...]
    """Shape in torch order (row length last)."""
    qtype: gguf.GGMLQuantizationType
    """Stored type."""
    nbytes: int
    """Bytes of data (without alignment padding)."""
    offset: int
    """Offset of the data from the start of its file."""
    shard: int = 0
    """Index of the file holding it (0 unless the output is split)."""


@dataclass(frozen=True)
class GGUFLayout:
    """The exact shape of a GGUF file before it is written (computed from headers, no weights read)."""

    method: str
    """Method name, e.g. "q4_k_m"."""
    file_name: str
    """``<name>.<METHOD>.gguf`` (the first shard's name when split)."""
    size: int
    """Exact size in bytes (all shards together when split)."""
    metadata_size: int
    """Bytes before the first tensor's data in the first file (header, key/values, tensor infos, padding)."""
    tensors: tuple[TensorLayout, ...]
    """Every tensor, in file order."""
    shards: tuple[tuple[str, int], ...] = ()
    """(file name, size) of every file: one entry unless split, then llama.cpp's -0000i-of-0000n names."""


@dataclass(frozen=True)
class _Tensor:
    """One tensor to write: where it comes from and what it becomes."""

    name: str
    """GGUF name."""
    shape: tuple[int, ...]
    """Shape in torch order."""
    hf_name: str | None = None
    """Name in the safetensors file (None for generated tensors)."""
    part: Path | None = None
    """Safetensors file holding it."""
    heads: int | None = None
    """Heads for the Llama q/k row permutation, None when not permuted."""
    data: torch.Tensor | None = None
    """Generated float32 data (rope_freqs, rope_factors_long/short)."""


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class _Safetensors:
    """Rows of the tensors of one safetensors file, read with plain file reads rather than a memory map,
    so that resident memory stays at one chunk instead of growing to the whole file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries, self.base = read_header(path)
        try:
            size = path.stat().st_size
            end = max((v["data_offsets"][1] for v in self.entries.values()), default=0)
            if self.base + end > size:
                raise ValueError(f"data ends at byte {self.base + end} but the file has {size}")
            bad = sorted({v["dtype"] for v in self.entries.values()} - set(_ST_DTYPES))
            if bad:
                raise ValueError(f"unsupported tensor dtype(s) {', '.join(bad)}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path} is not a readable safetensors file ({exc}). It may be truncated or "
                            "corrupt (or hold pre-quantized weights). Fix: download or save it again in "
                            "16-bit.") from exc
        self.fd: int | None = None
        self._opening = threading.Lock()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape."""
        return {k: tuple(v["shape"]) for k, v in self.entries.items()}

    def rows(self, name: str, rows: slice) -> torch.Tensor:
        """Rows ``rows`` of tensor ``name`` (the whole tensor for 1-D ones), in its stored dtype.

        Reads with ``pread`` at an absolute offset, so several threads may read from one file at once."""
        entry = self.entries[name]
        dtype, shape = _ST_DTYPES[entry["dtype"]], tuple(entry["shape"]) or (1,)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        first, last, _ = rows.indices(shape[0])
        # Uninitialised memory: bytearray(n) would zero every page first, holding the GIL the whole time.
        buffer = torch.empty((last - first) * row_bytes, dtype=torch.uint8)
        if self.fd is None:
            with self._opening:  # workers share one descriptor: open it once
                if self.fd is None:
                    self.fd = os.open(self.path, os.O_RDONLY)
        offset, view, done = self.base + entry["data_offsets"][0] + first * row_bytes, memoryview(buffer.numpy()), 0
        while done < len(view):
            got = _pread_into(self.fd, view[done:], offset + done)
            if got <= 0:
                raise OSError(f"{self.path} ended early while reading {name}")
            done += got
        return buffer.view(dtype).reshape(last - first, *shape[1:])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` at an absolute file offset without moving a shared file position (thread-safe)."""
    if hasattr(os, "preadv"):  # Linux, BSD: straight into the buffer
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # macOS
    view[:len(data)] = data
    return len(data)


class _Model:
    """A model folder read for conversion: config, architecture and the tensor list (weights stay on disk)."""

    def __init__(self, model_dir: str | os.PathLike[str], adapter: str | os.PathLike[str] | None = None,
                 device: str | None = None) -> None:
        self.dir = resolve_model(model_dir)
        self.hparams = archs.load_hparams(self.dir)
        self.arch = archs.find_arch(self.hparams, self.dir)
        self.n_blocks = archs.block_count(self.hparams)
        self.merged: Any = None
        """merge.MergedModel when a LoRA adapter is fused while converting (tensors come merged from it)."""
        self.tokenizer_dir = self.dir
        if adapter is not None:
            from unsloth_nb.merge import MergedModel

            self.merged = MergedModel(self.dir, Path(adapter).expanduser(), device)
            merged_config = self.merged.merged_config()
            for key in ("vocab_size", "tie_word_embeddings"):
                if key in merged_config:
                    self.hparams[key] = merged_config[key]
            self.tokenizer_dir = self.merged.tokenizer_dir
        self.tensors = self._index()

    @property
    def name(self) -> str:
        """Base of the output file names: the folder name."""
        return self.dir.resolve().name

    def input_files(self) -> list[Path]:
        """Every file the output depends on: weights, config, tokenizer files, and the adapter when fused."""
        from unsloth_nb.merge import TOKENIZER_FILES

        folders = [self.dir, self.tokenizer_dir]
        if self.merged is not None:
            folders.append(self.merged.adapter.path)
        side = [d / n for d in folders for n in ("config.json", "adapter_config.json", "adapter_model.safetensors",
                                                  *TOKENIZER_FILES)]
        return self._parts() + [p for p in side if p.is_file()]

    def _parts(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as exc:
                raise UserError(f"{index} is not a valid safetensors index ({exc}). Fix: restore it from the "
                                "model's source, or re-save the model with save_pretrained.") from exc
            parts = [self.dir / p for p in sorted(set(weight_map.values()))]
            missing = [p.name for p in parts if not p.is_file()]
            if missing:
                raise UserError(f"{self.dir} misses weight files listed in its index: {', '.join(missing)}. "
                                "Fix: finish the download or copy, then run again.")
            return parts
        parts = sorted(p for p in self.dir.iterdir() if p.name.startswith("model") and p.suffix == ".safetensors")
        if not parts:
            raise UserError(f"{self.dir} has no model*.safetensors weights. Fix: save the model with "
                            "save_pretrained(..., safe_serialization=True) or use the merge step's output.")
        return parts

    def _index(self) -> list[_Tensor]:
        tensors = [_Tensor(name, tuple(data.shape), data=data)
                   for name, data in archs.generated_tensors(self.arch, self.hparams)]
        if self.merged is not None:
            shapes = {name: tuple(shape) for name, (_, shape) in self.merged.shapes.items()}
            self._check_layers({k: v for k, v in shapes.items() if archs.is_text_tensor(k)})
            tensors += self._mapped(shapes, None)
        else:
            every: dict[str, tuple[int, ...]] = {}
            for part in self._parts():
                shapes = _Safetensors(part).shapes()
                every.update({k: v for k, v in shapes.items() if archs.is_text_tensor(k)})
                tensors += self._mapped(shapes, part)
            self._check_layers(every)
        rows = archs.token_rows(self.arch, self.hparams, self.tokenizer_dir)
        embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        return [dataclasses.replace(t, shape=(min(rows, t.shape[0]), *t.shape[1:]))
                if rows is not None and t.name == embd else t for t in tensors]

    def _check_layers(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """The weights must hold exactly the layers config.json announces (a wrong count writes a broken file)."""
        found = {int(m[1]) for name in shapes if (m := re.search(r"\.layers\.(\d+)\.", name))}
        if found and len(found) != self.n_blocks:
            raw = json.loads((self.dir / "config.json").read_text(encoding="utf-8"))
            said = ("has no num_hidden_layers, so the default" if "num_hidden_layers" not in raw
                    else "says num_hidden_layers =")
            raise UserError(f"{self.dir / 'config.json'} {said} {self.n_blocks} layers applies, but the weights hold "
                            f"{len(found)}. Fix: set num_hidden_layers to {len(found)} in config.json, or restore "
                            "the model's original config.json.")

    def _mapped(self, shapes: dict[str, tuple[int, ...]], part: Path | None) -> list[_Tensor]:
        """GGUF tensors for HF tensors of one file, in name order (the reference's order)."""
        tensors = []
        for hf_name in sorted(shapes):
            name = archs.gguf_tensor_name(self.arch, hf_name, self.n_blocks)
            if name is not None:
                heads = archs.qk_heads(self.arch, hf_name, self.hparams)
                tensors.append(_Tensor(name, shapes[hf_name], hf_name, part, heads))
        return tensors

    def model_shape(self) -> recipes.ModelShape:
        """The facts llama.cpp's type mix needs: layer and head counts, whether output.weight exists."""
        return recipes.ModelShape(
            n_layer=self.n_blocks,
            n_head=archs.find_hparam(self.hparams, ["num_attention_heads", "n_head", "n_heads"]),
            n_head_kv=archs.find_hparam(self.hparams, ["num_key_value_heads", "n_kv_heads"])
            or archs.find_hparam(self.hparams, ["num_attention_heads", "n_head", "n_heads"]),
            has_output=any(t.name == "output.weight" for t in self.tensors),
        )


def resolve_method(name: str) -> recipes.Method:
    """A method by name (``recipes.resolve``: case-insensitive, aliases, closest-name suggestion)."""
    return recipes.resolve(name)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype), dtype=np.int64))


def _file_name(model: _Model, method: recipes.Method) -> str:
    return f"{model.name}.{method.label}.gguf"


class _Plan:
    """Types per tensor for one method, and a GGUFWriter holding every tensor info and key/value."""

    def __init__(self, model: _Model, method: recipes.Method, shape: recipes.ModelShape,
                 split_max_size: int = 0) -> None:
        self.method = method
        self.types = [recipes.tensor_type(method, t.name, t.shape, shape) for t in model.tensors]
        self.writer = Writer(None, model.arch.name, split_max_size=split_max_size)
        for t, qtype in zip(model.tensors, self.types, strict=True):
            self.writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, qtype),
                                        raw_dtype=qtype)
        self.shard_of = [i for i, shard in enumerate(self.writer.tensors) for _ in shard]
        """Index of the file each tensor goes to (GGUFWriter splits by size as llama.cpp's converter does)."""

    def file_names(self, first: str) -> list[str]:
        """llama.cpp's shard names for a file called ``first`` (just ``[first]`` unless split)."""
        return [p.name for p in self.writer.format_shard_names(Path(first))]


class Writer(gguf.GGUFWriter):
    """gguf-py's writer, packing long metadata arrays (a vocabulary's tokens, scores, types and merges) with
    numpy in one go instead of one struct call per element: 0.5 s less per 128k-token vocabulary, same bytes."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None, *more: Any, **options: Any) -> bytes:
        if (vtype == gguf.GGUFValueType.ARRAY and self.endianess == gguf.GGUFEndian.LITTLE and not more
                and not options and isinstance(val, list | tuple) and len(val) >= 256):
            packed = _pack_array(val, sub_type)
            if packed is not None:
                return (struct.pack("<I", vtype) if add_vtype else b"") + packed
        return super()._pack_val(val, vtype, add_vtype, sub_type, *more, **options)


_NUMPY_TYPES = {gguf.GGUFValueType.UINT8: "<u1", gguf.GGUFValueType.INT8: "<i1", gguf.GGUFValueType.UINT16: "<u2",
                gguf.GGUFValueType.INT16: "<i2", gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.INT32: "<i4",
                gguf.GGUFValueType.UINT64: "<u8", gguf.GGUFValueType.INT64: "<i8", gguf.GGUFValueType.FLOAT32: "<f4",
                gguf.GGUFValueType.FLOAT64: "<f8", gguf.GGUFValueType.BOOL: "<u1"}


def _pack_array(val: list | tuple, sub_type: gguf.GGUFValueType | None) -> bytes | None:
    """An array's element type, count and elements as GGUFWriter packs them, for arrays of one Python type
    that numpy converts exactly as struct does (strings, ints to integer types, floats to float types, bools);
    None for anything else, which the caller packs element by element."""
    kinds = set(map(type, val))
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    ltype = sub_type if sub_type is not None else gguf.GGUFValueType.get_type(val[0])
    head = struct.pack("<IQ", ltype, len(val))
    if ltype == gguf.GGUFValueType.STRING and kind in (str, bytes):
        items = [v.encode("utf-8") for v in val] if kind is str else val
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        starts = np.arange(len(items), dtype=np.int64) * 8
        starts[1:] += np.cumsum(lengths[:-1])
        out = np.empty(8 * len(items) + int(lengths.sum()), dtype=np.uint8)
        slots = starts[:, None] + np.arange(8)
        out[slots] = lengths.astype("<u8").view(np.uint8).reshape(-1, 8)
        text = np.ones(out.size, dtype=bool)
        text[slots] = False
        out[text] = np.frombuffer(b"".join(items), dtype=np.uint8)
        return head + out.tobytes()
    dtype = _NUMPY_TYPES.get(ltype)
    if dtype is None:
        return None
    integer = np.dtype(dtype).kind in "iu"
    if not ((kind is bool and ltype == gguf.GGUFValueType.BOOL)
            or (kind is int and integer and ltype != gguf.GGUFValueType.BOOL)
            or (kind is float and np.dtype(dtype).kind == "f")):
        return None
    try:
        with np.errstate(over="ignore"):
            packed = np.array(val, dtype=dtype)
    except OverflowError:  # an integer out of the type's range: let struct raise its own error
        return None
    if packed.dtype.kind == "f" and (np.isinf(packed) & np.isfinite(np.array(val, dtype=np.float64))).any():
        return None  # a finite float too large for float32: struct refuses it, numpy would write inf
    return head + packed.tobytes()


def _metadata(model: _Model, template: gguf.GGUFWriter) -> dict[str, Any]:
    """Every key/value llama.cpp's converter writes (file type set per method later), in its order."""
    writer = template
    total, shared, expert, n_expert = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model.dir, None, total)
    generation = gguf.Metadata.load_generation_config(model.dir)
    if "penalty_repeat" not in generation and "repetition_penalty" in generation:
        meta.sampling_penalty_repeat = generation["repetition_penalty"]
    if meta.name is None:
        meta.name = model.dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    archs.write_hparams(writer, model.arch, model.hparams, 0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocabs.add_tokenizer(writer, model.tokenizer_dir, model.hparams, model.arch.vocab_order,
                         model.arch.reads_add_prefix_space)
    return dict(writer.kv_data[0])


def _prepare(model: _Model, methods: list[recipes.Method], split_max_size: int = 0) -> list[_Plan]:
    shape = model.model_shape()
    plans = [_Plan(model, m, shape, split_max_size) for m in methods]
    _add_metadata(model, plans)
    return plans


def _add_metadata(model: _Model, plans: list[_Plan]) -> None:
    """Every plan's key/values (the slow part of preparing: the vocabulary), file type per method."""
    kv = _metadata(model, _Plan(model, plans[0].method, model.model_shape()).writer)
    for plan in plans:
        plan.writer.kv_data[0].update(kv)
        plan.writer.kv_data[0][gguf.Keys.General.FILE_TYPE] = gguf.GGUFValue(int(plan.method.file_type),
                                                                             gguf.GGUFValueType.UINT32)


def _serialize(writer: gguf.GGUFWriter) -> list[bytes]:
    """Header, key/values and tensor infos of every file exactly as GGUFWriter writes them (no data padding)."""
    import io

    saved = [dict(kv) for kv in writer.kv_data]
    buffers = [io.BytesIO() for _ in writer.tensors]
    writer.fout = buffers
    writer.state = gguf.gguf_writer.WriterState.EMPTY
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    finally:
        writer.fout = None
        writer.state = gguf.gguf_writer.WriterState.NO_FILE
        writer.kv_data = saved
    return [b.getvalue() for b in buffers]


def _measure(plan: _Plan, model: _Model, file_name: str, heads: list[bytes]) -> GGUFLayout:
    """Exact layout from the serialized heads and the aligned size of every tensor's data."""
    align = plan.writer.data_alignment
    ends = [gguf.GGUFWriter.ggml_pad(len(h), align) for h in heads]
    tensors = []
    for t, qtype, shard in zip(model.tensors, plan.types, plan.shard_of, strict=True):
        nbytes = _nbytes(t.shape, qtype)
        tensors.append(TensorLayout(t.name, t.shape, qtype, nbytes, ends[shard], shard))
        ends[shard] += gguf.GGUFWriter.ggml_pad(nbytes, align)
    names = plan.file_names(file_name)
    return GGUFLayout(plan.method.name, names[0], sum(ends), gguf.GGUFWriter.ggml_pad(len(heads[0]), align),
                      tuple(tensors), tuple(zip(names, ends, strict=True)))


def layout(model_dir: str | os.PathLike[str], method: str | recipes.Method,
           split_max_size: int | None = None, adapter: str | os.PathLike[str] | None = None) -> GGUFLayout:
    """The exact file(s) ``convert`` would write for one method: sizes, offsets, types (no weights read)."""
    model = _Model(model_dir, adapter)
    m = resolve_method(method) if isinstance(method, str) else method
    plan = _prepare(model, [m], split_max_size or 0)[0]
    return _measure(plan, model, _file_name(model, m), _serialize(plan.writer))


def _load(t: _Tensor, model: _Model, handles: dict[Path, _Safetensors], rows: slice) -> torch.Tensor:
    """Rows of one tensor in their stored dtype (merged with the adapter if any), transformed as llama.cpp
    expects. Encoders cast to float32 themselves, so a bf16 -> bf16 copy never makes a float32 copy."""
    if t.data is not None:
        return t.data[rows]
    rows = slice(*rows.indices(t.shape[0])) if t.shape else rows  # within t.shape: a tensor may be trimmed
    if model.merged is not None:
        x = model.merged.get(t.hf_name)[rows]
    else:
        x = handles[t.part].rows(t.hf_name, rows)
    x = archs.transform(model.arch, t.hf_name, x)
    if t.heads is not None:
        x = archs.permute_qk(x, t.heads * x.shape[0] // t.shape[0])
    return x.contiguous()


_TORCH_FLOATS = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16,
                 gguf.GGMLQuantizationType.BF16: torch.bfloat16}


def _encode(x: torch.Tensor, qtype: gguf.GGMLQuantizationType, device: str | None) -> np.ndarray:
    """Bytes of ``x`` as ``qtype``. Float types use torch's casts (round-to-nearest-even, the same bits as
    gguf-py's numpy code for finite values, several times faster); block types go to ``quants.quantize``."""
    if qtype not in _TORCH_FLOATS:
        return quants.quantize(x, qtype, device=device)
    if not bool(torch.isfinite(x.sum())):  # a NaN or Inf anywhere makes the sum non-finite (cheap check)
        return quants.quantize(x, qtype, device=device)  # checks exactly; raises its UserError on NaN/Inf
    return x.to(_TORCH_FLOATS[qtype]).contiguous().view(torch.uint8).numpy()


def _row_chunks(t: _Tensor, model: _Model, chunk_elements: int = CHUNK_ELEMENTS) -> list[slice]:
    """Row ranges read at once: about CHUNK_ELEMENTS, whole heads for permuted q/k (the permutation stays
    inside a head), whole tensors when merged with an adapter or 1-D."""
    if len(t.shape) < 2 or model.merged is not None:
        return [slice(None)]
    row = int(np.prod(t.shape[1:]))
    step = max(1, chunk_elements // max(row, 1))
    if t.heads is not None:
        head_rows = t.shape[0] // t.heads
        step = max(1, step // head_rows) * head_rows
    return [slice(r, min(r + step, t.shape[0])) for r in range(0, t.shape[0], step)]


def _tensor_infos(head: bytes, tensors: list[TensorLayout]) -> list[tuple[str, tuple[int, ...], int, int]]:
    """The tensor infos at the end of a serialized header, as (name, shape in torch order, type, offset); the
    section's length comes from the names and ranks we meant to write, so the key/values need no parsing."""
    pos = len(head) - sum(8 + len(t.name.encode("utf-8")) + 4 + 8 * len(t.shape) + 12 for t in tensors)
    infos = []
    for _ in tensors:
        (n,) = struct.unpack_from("<Q", head, pos)
        name = head[pos + 8:pos + 8 + n].decode("utf-8", errors="replace")
        pos += 8 + n
        (n_dims,) = struct.unpack_from("<I", head, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", head, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", head, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    return infos


def _validate(path: Path, expected: GGUFLayout, shard: int, head: bytes) -> None:
    """Read a written file's header back: it must be the bytes we serialized, its tensor infos must describe
    the layout we meant (names, types, shapes, offsets) and the file must have the expected size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        written = f.read(len(head))
    tensors = [t for t in expected.tensors if t.shard == shard]
    problems = []
    if size != expected.shards[shard][1]:
        problems.append(f"size {size} != {expected.shards[shard][1]}")
    if written != head:
        problems.append("its header is not the one serialized")
    else:
        data_start = gguf.GGUFWriter.ggml_pad(len(head), gguf.GGUF_DEFAULT_ALIGNMENT)
        try:
            infos = _tensor_infos(written, tensors)
        except struct.error as exc:
            infos = []
            problems.append(f"unreadable tensor infos ({exc})")
        for (name, shape, qtype, offset), want in zip(infos, tensors, strict=False):
            if (name, shape, qtype, data_start + offset) != (want.name, want.shape, int(want.qtype), want.offset):
                problems.append(f"tensor {name}: type {qtype} {shape} @ {data_start + offset}, expected "
                                f"{want.name} {want.qtype.name} {want.shape} @ {want.offset}")
                break
    if problems:
        raise RuntimeError(f"{path} failed validation after writing: {'; '.join(problems)}")


def _check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the output folder {out_dir} ({exc.strerror}). Fix: choose a folder "
                        "you can write to with --out.") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"The output folder {out_dir} is not writable. Fix: choose a folder you can write to "
                        "with --out, or change its permissions.")


def prepare(methods: list[str], device: str | None = None) -> threading.Thread | None:
    """Start building the fused K-quant GPU kernels in a background thread, and return at once (the thread, or
    None when there is nothing to build: the CPU, or no K-quant method among ``methods``). All of them are
    built: a method's type mix spans several K-quant types, which depend on the model.

    Triton compiles the fused K-quant kernels the first time they run on a machine, which on a fresh one
    (every Colab session) takes seconds, and loads them in every new process (about a second). A notebook
    calls this before training, so the GGUF step finds them ready. Unknown names raise convert's UserError."""
    resolved = [resolve_method(m) if isinstance(m, str) else m for m in methods]
    device = device or quants.default_device()
    if device == "cpu" or not any(m.base_type in quants.K_QUANTS for m in resolved):
        return None
    thread = threading.Thread(target=quants.warm_up, args=(quants.K_QUANTS, device), name="gguf_prepare",
                              daemon=True)
    thread.start()
    return thread


def convert(model_dir: str | os.PathLike[str], methods: list[str], out_dir: str | os.PathLike[str], *,
            adapter: str | os.PathLike[str] | None = None, device: str | None = None,
            split_max_size: int | None = None, progress: bool = True,
            check_space: bool = True, overwrite: bool = False) -> list[ConvertResult]:
    """Write ``out_dir/<name>.<METHOD>.gguf`` for every method, reading the safetensors once for all of them.

    ``device`` is where quantization runs ("cuda" or "cpu"; default: the quantizer's choice).
    ``split_max_size`` (bytes) splits each output the way llama.cpp's converter does (``-00001-of-0000n``
    names, ``split.*`` keys). ``adapter`` (a peft LoRA folder) is fused while converting, tensor by tensor,
    giving the same file as merging first (``merge.merge``) and converting the merged folder.
    Each file is written as ``<final>.tmp-<pid>``, read back and checked, recorded in the folder's manifest
    (size, sha256, inputs) and then renamed, so a failed or killed run never leaves a file under a final name
    that is not complete. A re-run reuses files that are complete for the same inputs and replaces files it
    wrote earlier from other inputs; a file of the same name that unsloth_nb did not write is refused unless
    ``overwrite``. Before writing, the exact sizes are checked against the folder's free space (as the planner
    counts it: Kaggle's 20 GB cap included); ``check_space=False`` skips that, for fault-injection tests only.
    """
    if not methods:
        raise UserError("No GGUF method given. Fix: pass at least one, e.g. --quant q8_0.")
    resolved = [resolve_method(m) if isinstance(m, str) else m for m in methods]
    resolved = list({m.name: m for m in resolved}.values())
    model = _Model(model_dir, adapter, device)
    out = Path(out_dir).expanduser()
    _check_out_dir(out)
    started = time.perf_counter()
    split = split_max_size or 0
    shape = model.model_shape()
    plans = [_Plan(model, m, shape, split) for m in resolved]
    finals = [[out / name for name in p.file_names(_file_name(model, p.method))] for p in plans]
    inputs = [manifest.fingerprint(model.input_files(), method=p.method.name, split=split) for p in plans]
    done = _reusable(finals, inputs, out, overwrite)
    todo = [i for i in range(len(plans)) if not done[i]]
    temps = {i: [f.with_name(f"{f.name}.tmp-{os.getpid()}") for f in finals[i]] for i in todo}
    if check_space and todo:
        _check_ram(model, [plans[i].method.name for i in todo], (device or quants.default_device()) != "cpu")
    # Reading and quantizing start now, while this thread builds the metadata (mostly the vocabulary).
    chunks = _Chunks(model, [plans[i] for i in todo], device) if todo else None
    try:
        _add_metadata(model, plans)
        heads = [_serialize(p.writer) for p in plans]
        layouts = [_measure(p, model, _file_name(model, p.method), h) for p, h in zip(plans, heads, strict=True)]
        for final in (f for i in todo for f in finals[i]):
            manifest.remove_stale(out, re.escape(final.name) + r"\.tmp-(?P<pid>\d+)")
        need = sum(layouts[i].size for i in todo)
        if check_space and todo:
            _check_space(out, need)
        free_before = shutil.disk_usage(out).free
        try:
            if chunks is not None:
                digests = _write(chunks, [heads[i] for i in todo], [temps[i] for i in todo], progress)
                for i, files_digests in zip(todo, digests, strict=True):
                    for shard, temp in enumerate(temps[i]):
                        _validate(temp, layouts[i], shard, heads[i][shard])
                    manifest.record(out, {f.name: (layouts[i].shards[k][1], files_digests[k])
                                          for k, f in enumerate(finals[i])}, inputs[i])
                    for temp, final in zip(temps[i], finals[i], strict=True):
                        os.replace(temp, final)
        except OSError as exc:
            raise _write_error(exc, out, need, free_before) from exc
        finally:
            for temp in (t for files in temps.values() for t in files):
                temp.unlink(missing_ok=True)
    finally:
        if chunks is not None:
            chunks.close()
    seconds = time.perf_counter() - started
    return [ConvertResult(p.method.name, files[0], sum(f.stat().st_size for f in files),
                          0.0 if done[i] else seconds, len(model.tensors), tuple(files), reused=done[i])
            for i, (p, files) in enumerate(zip(plans, finals, strict=True))]


def _write_error(exc: OSError, out: Path, need: int, free_before: int) -> UserError:
    """The user's view of a failed write: disk full (with how much more was needed) or the OS's reason."""
    if exc.errno == errno.ENOSPC:
        return UserError(f"Disk full: the GGUF files need {_human(need)} in {out}, which had {_human(free_before)}"
                         f" free ({_human(max(need - free_before, 0))} more needed); nothing was left under a final"
                         " name and earlier files are intact. Fix: free that much space, convert fewer methods,"
                         " or choose another folder with --out.")
    return UserError(f"Writing GGUF files to {out} failed: {exc.strerror or exc}. Fix: free disk space or "
                     "choose another --out folder; nothing was left under a final name.")


def _reusable(finals: list[list[Path]], inputs: list[str], out: Path, overwrite: bool) -> list[bool]:
    """Per method: True when all its files are complete for these inputs; refuse to replace others' files."""
    done = []
    for files, fp in zip(finals, inputs, strict=True):
        states = [manifest.status(out, f.name, fp) for f in files]
        foreign = [f.name for f, s in zip(files, states, strict=True) if s == "foreign"]
        if foreign and not overwrite:
            raise UserError(f"{out / foreign[0]} already exists and was not written by unsloth_nb from this "
                            "model, so it is left alone. Fix: choose another folder with --out, move that file, "
                            "or pass --overwrite (overwrite=True) to replace it.")
        done.append(all(s == "complete" for s in states))
    return done


def _check_ram(model: _Model, methods: list[str], gpu: bool) -> None:
    """The planner's RAM check for the pass, before any chunk is read."""
    from unsloth_nb import plan

    lora = plan.size_adapter(model.merged.adapter.path) if model.merged is not None else None
    plan.require_ram("The GGUF pass", plan.gguf_ram(plan.size_model(model.dir), methods, lora, gpu))


def _check_space(out: Path, need: int) -> None:
    """Refuse before writing when the files cannot fit where they go."""
    from unsloth_nb import runtime

    free = runtime.detect().free_disk(out)
    if need > free:
        raise UserError(
            f"The GGUF files need {runtime.gb(need)} in {out}, which has {runtime.gb(free)} free "
            f"({runtime.gb(need - free)} short); nothing was written. Fix: convert fewer methods, free some space, or "
            "choose another folder with --out (`python -m unsloth_nb plan MODEL --quant ...` shows what fits where)."
        )


def _pad(fout: Any) -> None:
    """Zero bytes up to the next data alignment boundary, as GGUFWriter pads."""
    pos = fout.tell()
    fout.write(bytes(gguf.GGUFWriter.ggml_pad(pos, gguf.GGUF_DEFAULT_ALIGNMENT) - pos))


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (None: unchanged), restored afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encode_chunk(model: _Model, plans: list[_Plan], device: str | None, handles: dict[Path, _Safetensors],
                  i: int, rows: slice) -> tuple[int, list[np.ndarray]]:
    """Rows ``rows`` of tensor ``i`` read and encoded for every plan: (element count, one array per plan)."""
    t = model.tensors[i]
    try:
        x = _load(t, model, handles, rows)
    except Exception as exc:
        raise UserError(f"Reading tensor {t.hf_name} from {t.part} failed ({exc}). The file may be "
                        "corrupt. Fix: download or save the model again.") from exc
    return x.numel(), [np.ascontiguousarray(_encode(x, plan.types[i], device)) for plan in plans]


_FORKED: tuple[Any, ...] = ()
"""(model, plans, device, handles) for encode processes: set just before they are forked, which copies it
into them, so that a job is only (tensor index, rows) and a result only the encoded bytes."""


def _encode_forked(i: int, rows: slice) -> tuple[int, list[np.ndarray]]:
    return _encode_chunk(*_FORKED, i, rows)


def _worker_start(parent: int) -> None:
    """In a forked encode worker: one torch thread, and die with the parent. A worker blocked on its job
    queue would otherwise outlive a killed parent (a restarted notebook kernel) and keep its memory."""
    torch.set_num_threads(1)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _encoders(model: _Model, plans: list[_Plan], device: str | None, handles: dict[Path, _Safetensors],
              workers: int, on_cpu: bool) -> tuple[Executor, Callable[[int, slice], tuple[int, list[np.ndarray]]]]:
    """The pool that reads and encodes chunks, and the function it runs.

    Quantizing K-quants on the CPU is many small torch calls per chunk; in threads, their Python halves
    queue for the GIL, so on Linux those conversions use forked worker processes, each with one torch
    thread (about 12% faster on two cores). They inherit the model description and open the safetensors
    files themselves; only the encoded bytes travel back. Everything else (16-bit copies, Q8_0, a GPU)
    is bound by reads or the GPU and stays in threads."""
    global _FORKED
    heavy = any(t in quants.K_QUANTS for plan in plans for t in plan.types)
    forkable = sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()
    if not (on_cpu and heavy and forkable and workers > 1 and model.merged is None):
        return (ThreadPoolExecutor(workers, thread_name_prefix="gguf"),
                lambda i, rows: _encode_chunk(model, plans, device, handles, i, rows))
    _FORKED = (model, plans, device, handles)
    gc.freeze()  # the children share the parent's objects; keep their collector from touching (copying) them
    try:
        with warnings.catch_warnings():  # "process is multi-threaded": the children only run _encode_forked
            warnings.simplefilter("ignore", DeprecationWarning)
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                       initializer=_worker_start, initargs=(os.getpid(),))
            pool.submit(int).result()  # forks every worker now, while _FORKED and the frozen heap are set
    finally:
        gc.unfreeze()
        _FORKED = ()
    return pool, _encode_forked


class _Chunks:
    """Every tensor's row chunks, read and encoded for every plan by worker threads or processes, in file order.

    Workers start on construction, at most IN_FLIGHT chunks ahead of the consumer (iteration), so the
    caller can build the metadata meanwhile; on a GPU further ahead, while the waiting encoded bytes fit
    GPU_LOOKAHEAD_BYTES (a queued job holds no memory until one of the two workers takes it). On the CPU
    each worker keeps torch to one thread, so the workers, not torch, share the cores. ``close`` stops the
    workers and closes the files."""

    def __init__(self, model: _Model, plans: list[_Plan], device: str | None, ahead: int | None = None) -> None:
        """``ahead``: encoded bytes that may wait beyond IN_FLIGHT chunks (default: GPU_LOOKAHEAD_BYTES on a
        GPU, none on the CPU, whose workers are busy anyway)."""
        self.model, self.plans = model, plans
        self.handles = {part: _Safetensors(part)
                        for part in sorted({t.part for t in model.tensors if t.part is not None})}
        on_cpu = (device or quants.default_device()) == "cpu"
        workers, self.in_flight, chunk, self.ahead = WORKERS, IN_FLIGHT, CHUNK_ELEMENTS, 0
        if not on_cpu:
            workers, self.in_flight, chunk, self.ahead = 2, 3, CHUNK_ELEMENTS * GPU_CHUNK_FACTOR, GPU_LOOKAHEAD_BYTES
        if ahead is not None:
            self.ahead = ahead
        if model.merged is not None:  # fusing an adapter holds whole merged tensors: one at a time, as planned
            workers, self.in_flight, self.ahead = 1, 1, 0
        self._cleanup = contextlib.ExitStack()  # unwound by close(), last in first out
        self._cleanup.callback(lambda: [handle.close() for handle in self.handles.values()])
        self.pool, self.encode = _encoders(model, plans, device, self.handles, workers, on_cpu)
        self._cleanup.enter_context(_torch_threads(1 if on_cpu and workers > 1 else None))
        self._cleanup.callback(self.pool.shutdown, wait=True, cancel_futures=True)
        self.jobs = collections.deque((i, rows) for i, t in enumerate(model.tensors)
                                      for rows in _row_chunks(t, model, chunk))
        self.pending: collections.deque[tuple[int, int, Future]] = collections.deque()
        self.pending_bytes = 0
        """Encoded bytes the pending jobs produce (done or not)."""
        self._submit()

    def _encoded_bytes(self, i: int, rows: slice) -> int:
        t = self.model.tensors[i]
        shape = (len(range(*rows.indices(t.shape[0]))), *t.shape[1:]) if t.shape else t.shape
        return sum(_nbytes(shape, plan.types[i]) for plan in self.plans)

    def _submit(self) -> None:
        while self.jobs:
            i, rows = self.jobs[0]
            nbytes = self._encoded_bytes(i, rows)
            if len(self.pending) >= self.in_flight and self.pending_bytes + nbytes > self.ahead:
                return
            self.jobs.popleft()
            self.pending.append((i, nbytes, self.pool.submit(self.encode, i, rows)))
            self.pending_bytes += nbytes

    def __iter__(self) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        """(tensor index, element count, one encoded array per plan) for each chunk, in order."""
        while self.pending:
            i, nbytes, future = self.pending.popleft()
            self.pending_bytes -= nbytes
            try:
                count, parts = future.result()
            except BrokenProcessPool as exc:
                raise UserError("A GGUF worker process died while quantizing (most often the system ran out of "
                                "memory and killed it). Nothing was renamed into place. Fix: free memory (close "
                                "other notebooks, restart the runtime) or convert fewer methods at once.") from exc
            yield i, count, parts
            self._submit()

    def close(self) -> None:
        self._cleanup.close()


def _write(chunks: _Chunks, heads: list[list[bytes]], temps: list[list[Path]], progress: bool) -> list[list[str]]:
    """Write every plan's heads, then every chunk's data in order, aligned per tensor, into its file(s).

    Returns the sha256 of every file written, per plan and shard."""
    model, plans = chunks.model, chunks.plans
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(int(np.prod(t.shape)) for t in model.tensors)
        bar = tqdm(total=total, unit="param", unit_scale=True, desc=f"GGUF {model.name}", leave=False)
    files: list[list[Any]] = []
    written = -1
    try:
        for plan_heads, plan_temps in zip(heads, temps, strict=True):
            files.append([])
            for head, temp in zip(plan_heads, plan_temps, strict=True):
                files[-1].append(manifest.HashingFile(temp))
                files[-1][-1].write(head)
        for i, count, parts in chunks:
            if i != written:
                for plan, plan_files in zip(plans, files, strict=True):
                    _pad(plan_files[plan.shard_of[i]])
                written = i
            for plan, plan_files, data in zip(plans, files, parts, strict=True):
                plan_files[plan.shard_of[i]].write(memoryview(data).cast("B"))
            if bar is not None:
                bar.update(count)
        for fout in (f for plan_files in files for f in plan_files):
            _pad(fout)
            fout.close()
        return [[fout.hexdigest() for fout in plan_files] for plan_files in files]
    finally:
        if bar is not None:
            bar.close()
        for fout in (f for plan_files in files for f in plan_files):
            fout.close()


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _parse_size(text: str) -> int:
    units = {"K": 1000, "M": 1000**2, "G": 1000**3}
    value = text.strip().upper().rstrip("B")
    try:
        return int(float(value[:-1]) * units[value[-1]]) if value[-1:] in units else int(value)
    except ValueError:
        raise UserError(f"--split-max-size {text!r} is not a size. Fix: write it like 2G, 500M or 1000000.") from None


def convert_with_llamacpp(model_dir: str | os.PathLike[str], methods: list[str],
                          out_dir: str | os.PathLike[str]) -> list[ConvertResult]:
    """Run llama.cpp's own converter (from the llama-cpp-python sdist) for each method it supports."""
    from unsloth_nb.gguf import llamacpp

    model = Path(model_dir).expanduser()
    if not (model / "config.json").is_file():
        raise UserError(f"{model} is not a Hugging Face model folder (no config.json). Fix: pass the folder "
                        "that holds config.json and the *.safetensors weights.")
    out = Path(out_dir).expanduser()
    _check_out_dir(out)
    tree = llamacpp.source_tree()
    results = []
    for name in methods:
        m = resolve_method(name)
        if m.name not in ("f32", "f16", "bf16", "q8_0"):
            raise UserError(f"llama.cpp's converter writes only f32, f16, bf16 and q8_0, not {m.name}. Fix: use "
                            "the native backend for K-quants.")
        final = out / f"{model.resolve().name}.{m.name.upper()}.gguf"
        temp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
        cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model), "--outtype", m.name,
               "--outfile", str(temp)]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise UserError(f"llama.cpp's converter failed for {m.name}: {proc.stderr.strip()[-600:]}")
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)
        with open(final, "rb") as f:  # the header's tensor count (GGUFReader would parse the vocabulary too)
            (n,) = struct.unpack_from("<Q", f.read(16), 8)
        results.append(ConvertResult(m.name, final, final.stat().st_size, time.perf_counter() - started, n))
    return results


def run_cli(args: argparse.Namespace) -> int:
    """``python -m unsloth_nb gguf MODEL_DIR --quant q8_0,bf16 --out DIR``: one line per file written."""
    methods = [m for m in (s.strip() for s in args.quant.split(",")) if m]
    split = _parse_size(args.split_max_size) if getattr(args, "split_max_size", None) else None
    if Path(args.model).suffix == ".gguf" and Path(args.model).is_file():
        from unsloth_nb.gguf.requantize import requantize

        if args.adapter or split or getattr(args, "backend", "native") != "native":
            raise UserError("A GGUF source is re-quantized as it is: --adapter, --split-max-size and --backend "
                            "apply to HF folders only. Fix: drop them, or convert the HF folder instead.")
        results = requantize(args.model, methods, args.out, device=args.device, progress=sys.stderr.isatty(),
                             overwrite=getattr(args, "overwrite", False))
    elif getattr(args, "backend", "native") == "llama.cpp":
        if args.adapter or split:
            raise UserError("--adapter and --split-max-size work only with the native backend. Fix: drop "
                            "--backend llama.cpp, or merge first and convert the merged folder.")
        results = convert_with_llamacpp(args.model, methods, args.out)
    else:
        results = convert(args.model, methods, args.out, adapter=args.adapter, device=args.device,
                          split_max_size=split, progress=sys.stderr.isatty(),
                          overwrite=getattr(args, "overwrite", False))
    for r in results:
        for path in r.shards or (r.path,):
            took = "complete from an earlier run, kept" if r.reused else f"{r.seconds:.1f} s"
            print(f"{path}  {_human(path.stat().st_size)}  {took}")
    return 0
