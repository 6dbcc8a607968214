"""How a GGUF file is laid out, and how its header is serialised: shared by convert, requantize and the planner.

A GGUF file is a header (magic, version, counts), key/values, tensor infos (name, dimensions fastest-first,
type, offset), then the tensors' data, each aligned to 32 bytes. This module holds those facts once: byte
sizes per type, padding, how a tensor is read in row chunks (and how large the largest chunk is, which sets
the converter's memory), the serialisation of a writer's key/values and tensor infos (gguf-py's ``GGUFWriter``
collects them through its public ``add_*`` API; the bytes are written here, identical to what it writes, with
long arrays packed in one numpy pass), the exact layout that results, and the read-back check. No torch.
"""

from __future__ import annotations

import collections
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
"""Data section and every tensor's data start at a multiple of this many bytes."""

CHUNK_ELEMENTS = 1 << 22
"""Rows are read and quantized in chunks of at most this many elements (16 MiB as float32)."""
WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
"""Workers that read and encode chunks at the same time: threads (numpy, torch and file reads release the
GIL), or forked processes where the CPU quantizes K-quants."""
IN_FLIGHT = WORKERS + 2
"""Chunks read or encoded ahead of the writer at most on the CPU: bounds memory to a few chunks."""
MAX_IN_FLIGHT = 6
"""IN_FLIGHT on a machine with four or more cores: what memory estimates count, whatever machine makes them."""
GPU_CHUNK_FACTOR = 4
"""On a GPU, chunks are this many times larger: each chunk costs a fixed number of kernel launches and
host-device copies, so fewer, larger chunks are faster."""
GPU_WORKERS = 4
"""Worker threads on a GPU: each reads a chunk into its own page-locked buffer, copies it to the GPU and
copies the encoded bytes back, so several keep the disk, the bus and the GPU busy at once. Their host
memory (two page-locked buffers each and the encoded chunks in flight) stays within the MAX_IN_FLIGHT
chunks of float32 that ``peak_ram`` counts for the CPU."""
GPU_IN_FLIGHT = GPU_WORKERS + 1
"""Chunks held at once on a GPU (one per worker and the one being written)."""
GPU_LOOKAHEAD_BYTES = 512 << 20
"""On a GPU, encoded chunks may wait for the writer up to this many bytes. The file's first byte can only be
written once the metadata (mostly the vocabulary, about a second) is built; meanwhile the GPU quantizes
ahead instead of idling after three chunks. About a second of a Q4_K_M export's output."""
WORK_BYTES = 10
"""Working bytes per element of a chunk while converting: its float32 copy plus the quantizer's buffers."""
TOKENIZER_RAM_FACTOR = 28
"""The converter holds about this many bytes per byte of tokenizer.json while it builds the vocabulary
metadata (fitted on the fixture models' peak RSS: Llama-3 BPE and SentencePiece)."""

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


# ------------------------------------------------------------------------------------------------- sizes


def nbytes(shape: Sequence[int], qtype: T | int) -> int:
    """Bytes of a tensor of torch-order ``shape`` stored as ``qtype``."""
    block, size = gguf.GGML_QUANT_SIZES[T(qtype)]
    n = 1
    for d in shape:
        n *= int(d)
    return n // block * size


def aligned(n: int) -> int:
    """``n`` rounded up to the alignment."""
    return -(-n // ALIGNMENT) * ALIGNMENT


def padding(position: int) -> bytes:
    """The zero bytes that bring a file at ``position`` to the next alignment boundary."""
    return bytes(aligned(position) - position)


def bits_per_weight(method_name: str) -> int:
    """An upper bound on the bits per weight a method writes (sizes the output buffer of one chunk)."""
    return {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 9}.get(method_name, 7)


def row_chunks(shape: Sequence[int], chunk_elements: int = CHUNK_ELEMENTS, head_rows: int | None = None,
               whole: bool = False) -> list[slice]:
    """The row ranges a tensor is read in: about ``chunk_elements`` each, whole heads (``head_rows`` rows) for
    Llama's permuted q/k (the permutation stays inside a head), the whole tensor when ``whole`` (an adapter is
    fused) or for 1-D tensors."""
    if len(shape) < 2 or whole:
        return [slice(None)]
    row = 1
    for d in shape[1:]:
        row *= int(d)
    step = max(1, chunk_elements // max(row, 1))
    if head_rows:
        step = max(1, step // head_rows) * head_rows
    return [slice(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def largest_chunk(tensors: Sequence[tuple[Sequence[int], int | None]], chunk_elements: int = CHUNK_ELEMENTS,
                  whole: bool = False) -> int:
    """Elements of the largest chunk the converter holds for (shape, head rows) tensors (see row_chunks)."""
    biggest = 0
    for shape, head_rows in tensors:
        n = 1
        for d in shape:
            n *= int(d)
        if len(shape) < 2 or whole:
            biggest = max(biggest, n)
            continue
        rows = len(range(*row_chunks(shape, chunk_elements, head_rows)[0].indices(shape[0])))
        biggest = max(biggest, rows * (n // shape[0]))
    return biggest


def peak_ram(chunk: int, methods: Sequence[str], tokenizer_bytes: int, *, fused_adapter_bytes: int = 0,
             gpu: bool = False, output_bytes: int = 0) -> int:
    """Working memory of one conversion pass beyond the Python process itself: the chunks in flight for every
    output (one whole tensor when fusing an adapter, whose merge needs ``fused_adapter_bytes`` more), the
    vocabulary being built, and on a GPU the encoded chunks waiting for the writer (at most the outputs)."""
    per_chunk = WORK_BYTES + sum(bits_per_weight(m) for m in methods) // 8
    held = 1 if fused_adapter_bytes else MAX_IN_FLIGHT
    ram = TOKENIZER_RAM_FACTOR * tokenizer_bytes + held * chunk * per_chunk + fused_adapter_bytes
    if gpu and not fused_adapter_bytes:
        ram += min(GPU_LOOKAHEAD_BYTES, output_bytes)
    return ram


# ---------------------------------------------------------------------------------------- serialisation

_SCALARS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
            V.FLOAT32: "<f", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d", V.BOOL: "?"}
_NUMPY = {V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4", V.INT32: "<i4",
          V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT32: "<f4", V.FLOAT64: "<f8", V.BOOL: "<u1"}


def pack_value(value: Any, vtype: V, sub_type: V | None = None, *, with_type: bool = True) -> bytes:
    """One metadata value as GGUF stores it (little-endian), exactly as gguf-py's writer packs it, errors
    included; arrays of 256 or more values of one Python type go through numpy in one pass, and a long tuple
    that comes back (the cached vocabulary, see ``vocab.tokenizer_keys``) is packed once."""
    head = struct.pack("<I", vtype) if with_type else b""
    if vtype in _SCALARS:
        return head + struct.pack(_SCALARS[vtype], value)
    if vtype == V.STRING:
        data = value.encode("utf-8") if isinstance(value, str) else value
        return head + struct.pack("<Q", len(data)) + data
    if vtype != V.ARRAY:
        raise ValueError("Invalid GGUF metadata value type or value")
    if isinstance(value, tuple) and len(value) >= _PACKED_MIN:
        return head + _packed_tuple(value, sub_type)
    return head + _pack_array_value(value, sub_type)


def _pack_array_value(value: Any, sub_type: V | None) -> bytes:
    """An array's element type, count and elements."""
    if not isinstance(value, Sequence):
        raise ValueError("Invalid GGUF metadata array, expecting sequence")
    if len(value) == 0:
        raise ValueError("Invalid GGUF metadata array. Empty array")
    if sub_type is not None:
        ltype = sub_type
    elif isinstance(value, bytes):
        ltype = V.UINT8
    else:
        ltype = V.get_type(value[0])
        if not all(V.get_type(v) is ltype for v in value[1:]):
            raise ValueError("All items in a GGUF array should be of the same type")
    if len(value) >= _PACKED_MIN and isinstance(value, list | tuple):
        packed = _pack_array(value, ltype)
        if packed is not None:
            return struct.pack("<IQ", ltype, len(value)) + packed
    return struct.pack("<IQ", ltype, len(value)) + b"".join(pack_value(v, ltype, with_type=False) for v in value)


_PACKED_MIN = 256
"""Arrays of at least this many values are packed in one numpy pass (and kept, for tuples)."""
_PACKED_TUPLES = 8
"""Long tuples whose packed bytes are kept: the vocabulary's arrays, shared by every file of a tokenizer."""
_packed: collections.OrderedDict[tuple[int, V | None], tuple[tuple, bytes]] = collections.OrderedDict()
_packed_lock = threading.Lock()


def _packed_tuple(values: tuple, sub_type: V | None) -> bytes:
    """``_pack_array_value`` of a long tuple, reused while the same tuple object comes back (a tuple of strings or
    numbers cannot change, and the entry keeps it alive, so its id is not reused by another object)."""
    key = (id(values), sub_type)
    with _packed_lock:
        entry = _packed.get(key)
        if entry is None or entry[0] is not values:
            entry = _packed[key] = (values, _pack_array_value(values, sub_type))
            while len(_packed) > _PACKED_TUPLES:
                _packed.popitem(last=False)
        return entry[1]


def _pack_array(values: list | tuple, ltype: V) -> bytes | None:
    """The elements of an array of one Python type that numpy converts exactly as struct does (strings, ints to
    integer types, floats to float types, bools); None for anything else, packed element by element."""
    kinds = set(map(type, values))
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if ltype == V.STRING and kind in (str, bytes):
        items = [v.encode("utf-8") for v in values] if kind is str else values
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        starts = np.arange(len(items), dtype=np.int64) * 8
        starts[1:] += np.cumsum(lengths[:-1])
        out = np.empty(8 * len(items) + int(lengths.sum()), dtype=np.uint8)
        slots = starts[:, None] + np.arange(8)
        out[slots] = lengths.astype("<u8").view(np.uint8).reshape(-1, 8)
        text = np.ones(out.size, dtype=bool)
        text[slots] = False
        out[text] = np.frombuffer(b"".join(items), dtype=np.uint8)
        return out.tobytes()
    dtype = _NUMPY.get(ltype)
    if dtype is None:
        return None
    integer = np.dtype(dtype).kind in "iu"
    if not ((kind is bool and ltype == V.BOOL) or (kind is int and integer and ltype != V.BOOL)
            or (kind is float and np.dtype(dtype).kind == "f")):
        return None
    try:
        with np.errstate(over="ignore"):
            packed = np.array(values, dtype=dtype)
    except OverflowError:  # an integer out of the type's range: let struct raise its own error
        return None
    if packed.dtype.kind == "f" and (np.isinf(packed) & np.isfinite(np.array(values, dtype=np.float64))).any():
        return None  # a finite float too large for float32: struct refuses it, numpy would write inf
    return packed.tobytes()


def serialize(writer: gguf.GGUFWriter) -> list[bytes]:
    """Header, key/values and tensor infos of every file of ``writer`` (one per shard when split), exactly as
    gguf-py's writer would write them, from its public ``kv_data`` and ``tensors``: shard 0 holds every
    key/value, every shard the ``split.*`` keys. Nothing of the writer is changed."""
    shards = writer.tensors
    kv_sets = [dict(writer.kv_data[0])] + [{} for _ in shards[1:]]
    if len(shards) > 1:
        total = sum(len(t) for t in shards)
        for i, kv in enumerate(kv_sets):
            kv[gguf.Keys.Split.LLM_KV_SPLIT_NO] = gguf.GGUFValue(i, V.UINT16)
            kv[gguf.Keys.Split.LLM_KV_SPLIT_COUNT] = gguf.GGUFValue(len(shards), V.UINT16)
            kv[gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT] = gguf.GGUFValue(total, V.INT32)
    out = []
    for tensors, kv in zip(shards, kv_sets, strict=True):
        parts = [struct.pack("<IIQQ", gguf.GGUF_MAGIC, gguf.GGUF_VERSION, len(tensors), len(kv))]
        for key, value in kv.items():
            parts.append(pack_value(key, V.STRING, with_type=False))
            parts.append(pack_value(value.value, value.type, value.sub_type))
        offset = 0
        for name, info in tensors.items():
            dims = list(reversed(info.shape))
            parts.append(pack_value(name, V.STRING, with_type=False))
            parts.append(struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, info.dtype, offset))
            offset += aligned(info.nbytes)
        out.append(b"".join(parts))
    return out


# ---------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor lands in a GGUF file."""

    name: str
    """GGUF tensor name, e.g. "blk.0.attn_q.weight"."""
    shape: tuple[int, ...]
    """Shape in torch order (row length last)."""
    qtype: T
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


def measure(method: str, names: Sequence[str], tensors: Sequence[tuple[str, tuple[int, ...], T, int]],
            heads: Sequence[bytes]) -> GGUFLayout:
    """The exact layout from the serialized heads and (name, shape, type, shard) of every tensor in file
    order; ``names`` are the file names, one per shard."""
    ends = [aligned(len(h)) for h in heads]
    placed = []
    for name, shape, qtype, shard in tensors:
        size = nbytes(shape, qtype)
        placed.append(TensorLayout(name, tuple(shape), T(qtype), size, ends[shard], shard))
        ends[shard] += aligned(size)
    return GGUFLayout(method, names[0], sum(ends), aligned(len(heads[0])), tuple(placed),
                      tuple(zip(names, ends, strict=True)))


def tensor_infos(head: bytes, tensors: Sequence[TensorLayout]) -> list[tuple[str, tuple[int, ...], int, int]]:
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


def validate(path: Path, expected: GGUFLayout, shard: int, head: bytes) -> None:
    """Read a written file's header back: it must be the bytes we serialized, its tensor infos must describe
    the layout we meant (names, types, shapes, offsets) and the file must have the expected size. A failure
    is our bug (RuntimeError), never the user's."""
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
        data_start = aligned(len(head))
        try:
            infos = tensor_infos(written, tensors)
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
