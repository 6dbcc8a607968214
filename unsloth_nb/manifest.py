"""What is complete: every output is recorded with its size, its sha256 and the inputs it was made from.

A step writes under a temporary name and renames when done, so a final name never holds half a file. The
manifest adds the rest of the story a re-run needs: an output whose size and checksum match its record, made
from the same inputs, is *complete* and reused; one that unsloth_nb wrote earlier from other inputs is *ours*
and may be replaced; anything else under that name belongs to the user and is never overwritten unasked.
Temporary files left by a killed run (``<name>.tmp-<pid>``, ``.<name>.partial-<pid>``) are removed by the next
run once their process is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import unsloth_nb

MANIFEST = ".unsloth_nb_manifest.json"
"""Record of the outputs in a folder (hidden: it is bookkeeping, not a model file)."""
KNOWN_VERSIONS = 8
"""How many earlier checksums of one output are remembered as written by unsloth_nb."""


def fingerprint(files: Iterable[Path], **settings: object) -> str:
    """A short id of a step's inputs: each file's name, size and modification time, plus the settings."""
    h = hashlib.sha256(json.dumps({"version": unsloth_nb.__version__, **settings}, sort_keys=True,
                                  default=str).encode())
    for path in sorted({Path(p).resolve() for p in files}):
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class HashingFile:
    """A binary file opened for writing that keeps the sha256 of everything written to it.

    The hash of each piece runs on a helper thread while the piece is written (both release the GIL), so the
    checksum costs almost no wall time; at most one piece is held for it. Every ``WRITEBACK_BYTES`` written,
    a second helper starts an ``fdatasync``, so the disk writes while the caller computes the next pieces and
    the final fsync in ``close`` waits only for the last few pieces, not the whole file.
    """

    WRITEBACK_BYTES = 128 << 20
    """Bytes written between background flushes to the disk (0: flush only in ``close``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: BinaryIO = open(path, "wb")
        self.hash = hashlib.sha256()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="sha256")
        self._pending: Future | None = None
        self._flushing: Future | None = None
        self._unflushed = 0

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def write(self, data: bytes | memoryview) -> int:
        self._wait()
        self._pending = self._pool.submit(self.hash.update, data)
        written = self.handle.write(data)
        self._unflushed += written
        if self.WRITEBACK_BYTES and self._unflushed >= self.WRITEBACK_BYTES and (
                self._flushing is None or self._flushing.done()):
            if self._flushing is not None:
                self._flushing.result()  # a failed flush raises here, as the final fsync would
            self.handle.flush()
            self._flushing = self._pool.submit(os.fdatasync, self.handle.fileno())
            self._unflushed = 0
        return written

    def tell(self) -> int:
        return self.handle.tell()

    def close(self) -> None:
        """Flush to the disk (an fsync, so a completed record never points at data still in flight)."""
        self._wait()
        if self._flushing is not None:
            self._flushing.result()
            self._flushing = None
        self._pool.shutdown()
        if not self.handle.closed:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()

    def hexdigest(self) -> str:
        self._wait()
        return self.hash.hexdigest()


def load(folder: Path) -> dict[str, dict]:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def record(folder: Path, entries: dict[str, tuple[int, str]], inputs: str) -> None:
    """Record ``{name: (size, sha256)}`` as made from ``inputs`` (written atomically)."""
    files = load(folder)
    for name, (size, digest) in entries.items():
        old = files.get(name, {})
        known = [digest] + [d for d in old.get("known", []) if d != digest]
        files[name] = {"size": size, "sha256": digest, "inputs": inputs, "known": known[:KNOWN_VERSIONS]}
    temp = folder / f"{MANIFEST}.tmp-{os.getpid()}"
    temp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temp, folder / MANIFEST)


def status(folder: Path, name: str, inputs: str) -> str:
    """"missing", "complete" (same inputs, size and checksum match), "ours" (written by unsloth_nb, now
    stale or from other inputs) or "foreign" (someone else's file: never overwrite it unasked)."""
    path = folder / name
    if not path.exists():
        return "missing"
    entry = load(folder).get(name)
    if entry is None or not path.is_file():
        return "foreign"
    digest = sha256_file(path)
    if entry["inputs"] == inputs and path.stat().st_size == entry["size"] and digest == entry["sha256"]:
        return "complete"
    return "ours" if digest in entry.get("known", []) else "foreign"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path, pattern: str) -> list[Path]:
    """Remove our leftovers matching ``pattern`` (a regex with a ``pid`` group) whose process has ended."""
    removed = []
    if not folder.is_dir():
        return removed
    regex = re.compile(pattern)
    for path in folder.iterdir():
        m = regex.fullmatch(path.name)
        if m and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
