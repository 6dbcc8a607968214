"""llama.cpp's importance-matrix files, read and written: the GGUF layout ``llama-imatrix`` writes by default
and the legacy ``.dat`` layout, and the weights and metadata ``llama-quantize --imatrix`` takes from them.

The rules follow llama.cpp's ``tools/imatrix/imatrix.cpp`` (``save_imatrix``, ``save_imatrix_legacy``),
``common/imatrix-loader.cpp`` and ``tools/quantize/quantize.cpp`` (``load_imatrix``) and ``src/llama-quant.cpp``:

- ``counts`` is the number of rows (tokens) seen, one per matrix (per expert for expert tensors);
- the GGUF file holds ``general.type = "imatrix"``, ``imatrix.datasets``, ``imatrix.chunk_count`` (counted
  rows / chunk size), ``imatrix.chunk_size`` and, per weight in sorted name order, ``<name>.in_sum2`` (F32,
  [ne0, n_mat]) then ``<name>.counts`` (F32, [1, n_mat]); 2-D shapes whose last dimension is 1 are stored as
  1-D, as ggml does;
- the quantizer's weights are in_sum2 / count per matrix, 1.0 for an expert that saw no rows; a legacy
  ``.dat`` file stores (sum / count) * ncall per value and ncall per entry, and its weights are value / ncall;
- llama-quantize uses an entry only for a tensor it quantizes to a type whose quantizer takes weights, refuses
  an entry whose size is not the tensor's columns times experts (token embeddings excepted: quantized without),
  and records the file in ``quantize.imatrix.*`` keys (file and first dataset cut to 127 bytes, the entry
  count, and the chunk count when known, as uint32).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unsloth_nb.errors import UserError
from unsloth_nb.gguf import header

UNNAMED_DATASET = "(unnamed)"
"""Dataset name written when none is known: llama-quantize refuses a GGUF imatrix without imatrix.datasets,
and gguf-py cannot write an empty array."""

_GGUF_TYPE = "imatrix"
_SUM2, _COUNTS = ".in_sum2", ".counts"
_F32 = 0  # ggml type id of F32
_MAX_NAME = 4096
"""Longest tensor name accepted in a legacy .dat file (ggml's limit is 64; anything near this is damage)."""


@dataclass
class Imatrix:
    """Importance statistics per GGUF weight: ``entries[name] = (sum2, counts)``.

    ``sum2`` is float32 [n_mat, ne0]: per matrix (1, or one per expert) and input column, the sum of x^2 over the
    rows counted; ``counts`` is float32 [n_mat]: the rows counted per matrix. For a legacy ``.dat`` file (whose
    raw sums are lost) ``sum2`` holds its stored values and ``counts`` its ncall, which gives the same weights.
    """

    entries: dict[str, tuple[np.ndarray, np.ndarray]]
    datasets: list[str] = field(default_factory=list)
    """Where the data came from (file paths as given; in-memory rows are described)."""
    chunk_count: int = 0
    """Chunks of ``chunk_size`` tokens the statistics cover (llama.cpp: the most rows counted / chunk_size)."""
    chunk_size: int = 0
    """Tokens per chunk (the context of each forward sequence); 0 when unknown (legacy .dat files)."""

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def weights(self, name: str, row_len: int | None = None) -> np.ndarray | None:
        """What llama-quantize passes as ``quant_weights`` for the tensor ``name``: in_sum2 / count per input column
        (an expert that saw no rows gets 1.0), shaped (ne0,) for one matrix or (n_mat, ne0) for expert tensors; None
        when the file has no entry for it. ``row_len`` reshapes a flat legacy entry into rows of that length."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        sum2, counts = entry
        if row_len is not None:
            if sum2.size % row_len:
                raise UserError(f"The importance matrix entry {name} holds {sum2.size} values, not a whole number of "
                                f"rows of {row_len}: it was computed for another model. Fix: recompute it on this "
                                "model.")
            sum2 = sum2.reshape(-1, row_len)
            counts = np.resize(counts, sum2.shape[0]) if counts.size != sum2.shape[0] else counts
        rounded = np.rint(counts).astype(np.float32)  # the loader rounds counts to integers (std::lround)
        out = np.ones(sum2.shape, dtype=np.float32)
        seen = rounded > 0
        out[seen] = sum2[seen] / rounded[seen, None]
        return out[0] if out.shape[0] == 1 else out

    def for_tensor(self, name: str, qtype: int, shape: Sequence[int]) -> np.ndarray | None:
        """The weights llama-quantize gives the quantizer of tensor ``name`` (torch-order ``shape``) stored as
        ``qtype``: None where it gives none (a type whose quantizer takes no weights, or no entry for the tensor);
        an entry of another size is a UserError, as llama-quantize refuses it (token embeddings excepted)."""
        from unsloth_nb.gguf import quants

        if qtype not in quants.IMATRIX_TYPES or name not in self.entries:
            return None
        sum2, counts = self.entries[name]
        experts = shape[0] if len(shape) == 3 else 1
        if sum2.size != shape[-1] * experts:
            if name == "token_embd.weight":
                return None
            raise UserError(f"The importance matrix has {sum2.size} values for {name}, which has {shape[-1]} input "
                            f"columns{f' in each of {experts} experts' if experts > 1 else ''}: it was computed for "
                            "another model. Fix: recompute it on this model (`python -m unsloth_nb imatrix MODEL_DIR "
                            "--data FILE --out FILE.imatrix.gguf`), or convert without --imatrix.")
        return self.weights(name, int(shape[-1]))

    def quantize_metadata(self, file: str) -> dict[str, Any]:
        """The ``quantize.imatrix.*`` key/values llama-quantize writes into a file quantized with this imatrix,
        read from ``file`` (the path as the user gave it), as gguf-py values in llama-quantize's order."""
        import gguf

        def text(value: str) -> gguf.GGUFValue:  # llama.cpp copies at most 127 bytes
            return gguf.GGUFValue(value.encode()[:127].decode("utf-8", "ignore"), gguf.GGUFValueType.STRING)

        out = {"quantize.imatrix.file": text(file)}
        if self.datasets:
            out["quantize.imatrix.dataset"] = text(self.datasets[0])
        out["quantize.imatrix.entries_count"] = gguf.GGUFValue(len(self.entries), gguf.GGUFValueType.UINT32)
        if self.chunk_count > 0:
            out["quantize.imatrix.chunks_count"] = gguf.GGUFValue(int(self.chunk_count), gguf.GGUFValueType.UINT32)
        return out

    def save(self, path: str | os.PathLike[str], *, format: str = "gguf", overwrite: bool = False) -> Path:
        """Write the file llama-quantize reads with ``--imatrix``: GGUF (llama-imatrix's default layout) or
        ``format="dat"`` (the legacy layout older llama.cpp builds read). Written under a temporary name in the
        same folder and renamed when complete; an existing file is replaced only with ``overwrite``. Returns the
        path."""
        if format not in ("gguf", "dat"):
            raise UserError(f"Unknown imatrix format {format!r}. Fix: use 'gguf' (llama.cpp's default) or 'dat'.")
        if not self.entries:
            raise UserError("The importance matrix has no entries, so there is nothing to save. Fix: collect it "
                            "from data that reaches the model (at least 16 tokens).")
        final = Path(path).expanduser()
        if final.is_dir():
            raise UserError(f"{final} is a folder. Fix: pass a file name such as {final / 'model.imatrix.gguf'}.")
        if final.exists() and not overwrite:
            raise UserError(f"{final} already exists and is left as it is. Fix: choose another name, or pass "
                            "--overwrite (overwrite=True) to replace it.")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"Cannot create the folder {final.parent} ({exc.strerror}). Fix: choose a folder you "
                            "can write to.") from None
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        try:
            if format == "gguf":
                self._write_gguf(tmp)
            else:
                tmp.write_bytes(self._dat_bytes())
            os.replace(tmp, final)
        except OSError as exc:
            raise UserError(f"Writing the importance matrix {final} failed: {exc.strerror or exc}. Fix: free disk "
                            "space or choose another folder; nothing was left under that name.") from None
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def _write_gguf(self, tmp: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(tmp, arch="")  # an empty arch writes no general.architecture, as llama-imatrix
        try:
            writer.add_type(_GGUF_TYPE)
            writer.add_array(gguf.Keys.IMatrix.DATASETS, list(self.datasets) or [UNNAMED_DATASET])
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(self.chunk_count))
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(self.chunk_size))
            for name in sorted(self.entries):
                sum2, counts = self.entries[name]
                n_mat = counts.size
                values = np.ascontiguousarray(sum2, dtype=np.float32).reshape(n_mat, -1)
                tallies = np.ascontiguousarray(counts, dtype=np.float32).reshape(n_mat, 1)
                writer.add_tensor(name + _SUM2, values[0] if n_mat == 1 else values)
                writer.add_tensor(name + _COUNTS, tallies[0] if n_mat == 1 else tallies)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    def _dat_bytes(self) -> bytes:
        """The legacy layout: per entry with any data, in sorted name order, (sum / count) * ncall where ncall is
        the chunks seen (rounded up), 1 * ncall for an expert without data; then the chunk count and dataset."""
        out = bytearray()
        kept = [n for n in sorted(self.entries) if np.any(np.rint(self.entries[n][1]) > 0)]
        out += struct.pack("<i", len(kept))
        for name in kept:
            sum2, counts = self.entries[name]
            rounded = np.rint(counts).astype(np.float32)
            most = int(rounded.max())
            ncall = -(-most // self.chunk_size) if self.chunk_size > 0 else most  # read from a .dat: its ncall
            values = np.empty(sum2.shape, dtype=np.float32)
            for i, count in enumerate(rounded):
                if count == ncall:  # a .dat's own entry: its values as they were
                    values[i] = sum2[i]
                else:  # llama-imatrix's order of operations, in float32
                    values[i] = (sum2[i] / count if count > 0 else np.float32(1.0)) * np.float32(ncall)
            encoded = name.encode()
            out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, sum2.size)
            out += values.astype("<f4").tobytes()
        dataset = (self.datasets[-1] if self.datasets else "").encode()
        out += struct.pack("<ii", int(self.chunk_count), len(dataset)) + dataset
        return bytes(out)


# ------------------------------------------------------------------------------------------------- reading


def load(path: str | os.PathLike[str]) -> Imatrix:
    """Read an importance matrix: a GGUF imatrix (ours or llama-imatrix's) or a legacy ``.dat`` file. Anything
    else, a damaged or truncated file included, is a UserError naming the file; sizes are checked against the
    file before anything is read, so a damaged count never allocates memory."""
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise UserError(f"The importance matrix {file} {what}. Fix: pass the .gguf (or .dat) file that "
                        "`python -m unsloth_nb imatrix` or llama-imatrix wrote.")
    try:
        with open(file, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise UserError(f"Cannot read the importance matrix {file} ({exc.strerror}). Fix: check its "
                        "permissions.") from None
    if magic == b"GGUF":
        return _load_gguf(file)
    return _load_dat(file)


def _damaged(file: Path, why: str, fix: str = "") -> UserError:
    fix = fix or ("recompute it (`python -m unsloth_nb imatrix MODEL_DIR --data FILE --out FILE.imatrix.gguf`, or "
                  "llama-imatrix) and pass that file")
    return UserError(f"{file} is not an importance matrix llama.cpp can use: {why}. Fix: {fix}.")


def _load_gguf(file: Path) -> Imatrix:
    try:
        head = header.read(file, tensors=True)
    except (OSError, ValueError, EOFError, struct.error, OverflowError, MemoryError) as exc:
        raise _damaged(file, f"its GGUF header is damaged or truncated ({exc})") from None
    kind = head.values.get("general.type")
    pairs: dict[str, dict[str, header.TensorInfo]] = {}
    for info in head.tensors:
        for suffix in (_SUM2, _COUNTS):
            if info.name.endswith(suffix) and len(info.name) > len(suffix):
                pairs.setdefault(info.name[: -len(suffix)], {})[suffix] = info
    if kind not in (None, _GGUF_TYPE) or not pairs:
        if kind == "model" or "general.architecture" in head.values:
            arch = head.values.get("general.architecture", "a model")
            raise _damaged(file, f"it is a model GGUF ({arch}, {len(head.tensors)} tensors)",
                           "pass the imatrix file (e.g. model.imatrix.gguf) here; the model GGUF is what gets "
                           "quantized")
        raise _damaged(file, f"it is a GGUF of type {kind!r} with no imatrix data (.in_sum2/.counts tensors)")
    alignment = head.values.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise _damaged(file, f"its data alignment {alignment!r} is invalid")
    data_start = -(-head.end // alignment) * alignment
    entries = {}
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for name in sorted(pairs):
            parts = pairs[name]
            if len(parts) != 2:
                raise _damaged(file, f"the entry {name} has only one of {_SUM2} and {_COUNTS}")
            sums = _f32_tensor(file, buf, parts[_SUM2], data_start, head.size)
            counts = _f32_tensor(file, buf, parts[_COUNTS], data_start, head.size)
            if counts.size == 0 or sums.size == 0 or sums.size % counts.size:
                raise _damaged(file, f"the entry {name} has {sums.size} sums for {counts.size} counts")
            if not (np.isfinite(sums).all() and np.isfinite(counts).all()) or (counts < 0).any() or (sums < 0).any():
                raise _damaged(file, f"the entry {name} holds negative, NaN or infinite values")
            entries[name] = (sums.reshape(counts.size, -1), counts)
    datasets = _string_array(file, head.entries.get("imatrix.datasets"))
    return Imatrix(entries, datasets, _u32(file, head.values, "imatrix.chunk_count"),
                   _u32(file, head.values, "imatrix.chunk_size"))


def _f32_tensor(file: Path, buf: mmap.mmap, info: header.TensorInfo, data_start: int, size: int) -> np.ndarray:
    if info.qtype != _F32:
        raise _damaged(file, f"the tensor {info.name} is of ggml type {info.qtype}, not F32")
    if not 1 <= len(info.shape) <= 4 or any(d < 0 for d in info.shape):
        raise _damaged(file, f"the tensor {info.name} has the shape {info.shape}")
    n = math.prod(info.shape)
    begin = data_start + info.offset
    if begin + 4 * n > size:
        raise _damaged(file, f"the file is truncated: the tensor {info.name} ends past its end")
    return np.frombuffer(buf, dtype="<f4", count=n, offset=begin).astype(np.float32)


def _u32(file: Path, values: Mapping[str, Any], key: str) -> int:
    value = values.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _damaged(file, f"{key} is {value!r}, not a count")
    return value


def _string_array(file: Path, entry: bytes | None) -> list[str]:
    """The strings of a GGUF array-of-strings key/value entry (key, type, value as stored), or [] without one."""
    if entry is None:
        return []
    try:
        (key_len,) = struct.unpack_from("<Q", entry, 0)
        pos = 8 + key_len
        vtype, etype, count = struct.unpack_from("<IIQ", entry, pos)
        pos += 16
        if vtype != header.ARRAY or etype != header.STRING:
            raise ValueError("not an array of strings")
        out = []
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", entry, pos)
            pos += 8
            if pos + n > len(entry):
                raise ValueError("a string runs past the entry")
            out.append(entry[pos:pos + n].decode("utf-8", "replace"))
            pos += n
        return out
    except (struct.error, ValueError) as exc:
        raise _damaged(file, f"imatrix.datasets is damaged ({exc})") from None


def _load_dat(file: Path) -> Imatrix:
    """The legacy layout (see ``save_imatrix_legacy``), read through a memory map with every length checked
    against the bytes that are left (a large file that is no imatrix is never read into memory)."""
    if file.stat().st_size < 4:
        raise _damaged(file, "it is neither a GGUF file nor a legacy .dat imatrix (it is too short)")
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse_dat(file, data)


def _parse_dat(file: Path, data: mmap.mmap) -> Imatrix:
    pos = 0

    def take() -> int:
        nonlocal pos
        if pos + 4 > len(data):
            raise _damaged(file, "the file is truncated")
        (value,) = struct.unpack_from("<i", data, pos)
        pos += 4
        return value

    n_entries = take()
    if n_entries < 1 or n_entries * 13 > len(data) - 4:  # an entry takes at least 13 bytes
        raise _damaged(file, f"it is neither a GGUF file nor a legacy .dat imatrix (its first word, read as an "
                             f"entry count, is {n_entries} for {len(data)} bytes)")
    entries = {}
    for i in range(n_entries):
        length = take()
        if not 0 < length <= min(_MAX_NAME, len(data) - pos):
            raise _damaged(file, f"entry {i + 1} has a name of {length} bytes")
        try:
            name = data[pos:pos + length].decode("utf-8")
        except UnicodeDecodeError:
            raise _damaged(file, f"the name of entry {i + 1} is not text") from None
        pos += length
        ncall, nval = take(), take()
        if nval < 1 or 4 * nval > len(data) - pos:
            raise _damaged(file, f"entry {i + 1} ({name}) claims {nval} values, more than the file holds")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        if not np.isfinite(values).all() or (values < 0).any():
            raise _damaged(file, f"entry {i + 1} ({name}) holds negative, NaN or infinite values")
        # weights = values / ncall; with no ncall llama-quantize takes the values as they are
        entries[name] = (values[None, :], np.array([ncall if ncall > 0 else 1], dtype=np.float32))
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):  # optional trailer: chunk count, dataset name
        chunk_count = max(take(), 0)
        if pos + 4 <= len(data):
            length = take()
            if 0 < length <= len(data) - pos:
                datasets.append(data[pos:pos + length].decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunk_count, 0)
