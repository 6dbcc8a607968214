"""gguf-py's own writer as an oracle: the header bytes it writes for a writer's key/values and tensor infos."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf


def gguf_py_head(writer: gguf.GGUFWriter) -> bytes:
    """Header, key/values and tensor infos exactly as gguf-py writes them (its public file API, one shard)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "head.gguf"
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return path.read_bytes()
