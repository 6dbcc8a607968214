"""A GGUF file's header, read without decoding its vocabulary.

gguf-py's ``GGUFReader`` builds every vocabulary entry as numpy objects, which takes seconds to tens of seconds
on a 128k-token file. Reading a method, a context length or a key/value section to copy needs none of that:
this walks the header's bytes once, keeps each key/value entry as the bytes it is stored as, decodes only the
scalar and string values, and optionally the tensor infos.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                  12: "<d"}
"""GGUF metadata value types with a fixed size, and how they are packed."""
STRING, ARRAY = 8, 9
"""The two variable-size GGUF metadata value types."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    """Torch order (GGUF stores dimensions fastest-first)."""
    qtype: int
    offset: int
    """Offset of its data from the start of the data section."""


@dataclass(frozen=True)
class Header:
    version: int
    entries: dict[str, bytes]
    """key -> the whole entry (key, type, value) as stored, in file order."""
    values: dict[str, Any]
    """key -> value, for the scalar and string entries (arrays are skipped)."""
    tensors: list[TensorInfo]
    """Empty unless read with ``tensors=True``."""
    end: int
    """File offset just past what was read (the key/values, or the tensor infos with ``tensors=True``)."""
    size: int
    """The file's size in bytes."""


def read(path: str | os.PathLike[str], tensors: bool = True) -> Header:
    """The header of the GGUF file ``path``. A damaged or truncated file raises OSError, ValueError (which
    includes UnicodeDecodeError), EOFError or struct.error; callers turn them into their own UserError."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            value = struct.unpack_from(fmt, buf, pos)[0]
            pos += struct.calcsize(fmt)
            return value

        def text(errors: str = "replace") -> str:
            nonlocal pos
            n = take("<Q")
            pos += n
            if pos > len(buf):
                raise EOFError("the file ends inside its header")
            return bytes(buf[pos - n:pos]).decode("utf-8", errors)

        def skip(vtype: int, count: int = 1) -> None:
            nonlocal pos
            if vtype in SCALAR_FORMATS:
                pos += struct.calcsize(SCALAR_FORMATS[vtype]) * count
            elif vtype == STRING:
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                    if pos > len(buf):
                        break
            elif vtype == ARRAY:
                for _ in range(count):
                    etype, n = struct.unpack_from("<IQ", buf, pos)
                    pos += 12
                    skip(etype, n)
                    if pos > len(buf):
                        break
            else:
                raise ValueError(f"unknown metadata type {vtype}")
            if pos > len(buf):  # a length no file of this size can hold: stop before reading past the end
                raise EOFError("the file ends inside its header")

        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        pos = 24
        entries, values = {}, {}
        for _ in range(n_kv):
            begin = pos
            key, vtype = text(), take("<I")
            if vtype == STRING:
                values[key] = text()
            elif vtype in SCALAR_FORMATS:
                values[key] = take(SCALAR_FORMATS[vtype])
            else:
                skip(vtype)
            if pos > len(buf):
                raise EOFError("the file ends inside its header")
            entries[key] = bytes(buf[begin:pos])
        infos = []
        for _ in range(n_tensors if tensors else 0):
            name, n_dims = text("strict"), take("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
            pos += 8 * n_dims
            infos.append(TensorInfo(name, tuple(int(d) for d in reversed(dims)), take("<I"), take("<Q")))
        return Header(version, entries, values, infos, pos, len(buf))


def require(path: str | os.PathLike[str]) -> Header:
    """The header of a GGUF file a user gave, checked: a readable GGUF (version 2 or 3), known tensor types, and
    every tensor's data inside the file. Any problem is a UserError that names the file and the fix."""
    import gguf

    from unsloth_nb.errors import UserError

    fix = "Fix: re-create it with `python -m unsloth_nb gguf` (a copy may have been cut short)."
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder where a .gguf file belongs. {fix}")
    try:
        head = read(path, tensors=True)
    except FileNotFoundError:
        raise UserError(f"The GGUF file {path} does not exist. Fix: pass the .gguf file the export wrote.") from None
    except (OSError, ValueError, EOFError, struct.error) as exc:
        raise UserError(f"{path} is not a readable GGUF file ({exc}). {fix}") from None
    if head.version not in (2, 3):
        raise UserError(f"{path} is GGUF version {head.version}; llama.cpp reads versions 2 and 3. {fix}")
    alignment = head.values.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise UserError(f"{path} declares the alignment {alignment!r}. {fix}")
    start = -(-head.end // alignment) * alignment
    end = start
    for t in head.tensors:
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.qtype)]
        except (ValueError, KeyError):
            raise UserError(f"{path}: tensor {t.name} has the unknown type {t.qtype}. {fix}") from None
        count = 1
        for d in t.shape:
            count *= d
        if count % block:
            raise UserError(f"{path}: tensor {t.name} of shape {t.shape} does not fill whole blocks. {fix}")
        end = max(end, start + t.offset + count // block * size)
    if end > head.size:
        raise UserError(f"{path} is not a readable GGUF file: it is cut short (its tensors need {end} bytes, the file "
                        f"has {head.size}). {fix}")
    return head
