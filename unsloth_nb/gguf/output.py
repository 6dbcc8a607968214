"""Where GGUF files are written and how they appear: checks before the first byte, temporary names, the
hashing writer, the read-back check and the rename, and the user's view of a failed write.

Shared by ``convert`` (HF folder -> GGUF) and ``requantize`` (GGUF -> GGUF), so that both refuse the same
things before writing (an unwritable folder, too little space, someone else's file under the name) and both
leave nothing that looks complete when interrupted: every file is written as ``<final>.tmp-<pid>``, read back
and checked, recorded in the folder's manifest (size, sha256, inputs) and only then renamed.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unsloth_nb import manifest
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import layout


@dataclass(frozen=True)
class ConvertResult:
    """One GGUF file written (or kept) by ``convert`` or ``requantize``."""

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


def human(n: float) -> str:
    """Bytes for a one-line report ("812.3 MB")."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def check_out_dir(out_dir: Path) -> bool:
    """Make sure the output folder exists and is writable; True when this call created it (so a failed run
    can remove it again and leave no empty folder behind)."""
    created = not out_dir.exists()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"The output folder {out_dir} is a file. Fix: choose a folder with --out.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the output folder {out_dir} ({exc.strerror}). Fix: choose a folder "
                        "you can write to with --out.") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"The output folder {out_dir} is not writable. Fix: choose a folder you can write to "
                        "with --out, or change its permissions.")
    return created


def remove_if_empty(out_dir: Path, created: bool) -> None:
    """Remove an output folder this run created when nothing ended up in it (a refused or failed run)."""
    if created and out_dir.is_dir() and not any(p.name != manifest.MANIFEST for p in out_dir.iterdir()):
        for p in out_dir.iterdir():
            p.unlink()
        out_dir.rmdir()


def check_space(out: Path, need: int) -> None:
    """Refuse before writing when the files cannot fit where they go (Kaggle's 20 GB cap included)."""
    from unsloth_nb import runtime

    free = runtime.detect().free_disk(out)
    if need > free:
        raise UserError(
            f"The GGUF files need {runtime.gb(need)} in {out}, which has {runtime.gb(free)} free "
            f"({runtime.gb(need - free)} short); nothing was written. Fix: convert fewer methods, free some space, or "
            "choose another folder with --out (`python -m unsloth_nb plan MODEL --quant ...` shows what fits where)."
        )


def reusable(finals: Sequence[Sequence[Path]], inputs: Sequence[str], out: Path, overwrite: bool) -> list[bool]:
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


def temporary(final: Path) -> Path:
    """The name a file is written under until it is complete: ``<final>.tmp-<pid>`` in the same folder."""
    return final.with_name(f"{final.name}.tmp-{os.getpid()}")


def remove_stale(out: Path, finals: Sequence[Path]) -> None:
    """Remove temporary files of earlier runs whose process is gone (a killed run's leftovers)."""
    for final in finals:
        manifest.remove_stale(out, re.escape(final.name) + r"\.tmp-(?P<pid>\d+)")


def write_error(exc: OSError, out: Path, need: int, free_before: int) -> UserError:
    """The user's view of a failed write: disk full (with how much more was needed) or the OS's reason."""
    if exc.errno == errno.ENOSPC:
        return UserError(f"Disk full: the GGUF files need {human(need)} in {out}, which had {human(free_before)}"
                         f" free ({human(max(need - free_before, 0))} more needed); nothing was left under a final"
                         " name and earlier files are intact. Fix: free that much space, convert fewer methods,"
                         " or choose another folder with --out.")
    return UserError(f"Writing GGUF files to {out} failed: {exc.strerror or exc}. Fix: free disk space or "
                     "choose another --out folder; nothing was left under a final name.")


class Files:
    """The files of one pass: per output (method), one hashing file per shard, each started with its header.

    ``begin_tensor`` pads every file of the shard a tensor goes to; ``write`` appends one output's bytes;
    ``close`` pads and closes them and returns each file's sha256."""

    def __init__(self, temps: Sequence[Sequence[Path]], heads: Sequence[Sequence[bytes]]) -> None:
        self.files: list[list[manifest.HashingFile]] = []
        try:
            for plan_temps, plan_heads in zip(temps, heads, strict=True):
                self.files.append([])
                for temp, head in zip(plan_temps, plan_heads, strict=True):
                    self.files[-1].append(manifest.HashingFile(temp))
                    self.files[-1][-1].write(head)
        except BaseException:
            self.abort()
            raise

    def begin_tensor(self, shards: Sequence[int]) -> None:
        """Align every output's file ``shards[k]`` before the next tensor's data."""
        for plan_files, shard in zip(self.files, shards, strict=True):
            f = plan_files[shard]
            f.write(layout.padding(f.tell()))

    def write(self, output: int, shard: int, data: memoryview) -> None:
        self.files[output][shard].write(data)

    def close(self) -> list[list[str]]:
        for f in (f for plan_files in self.files for f in plan_files):
            f.write(layout.padding(f.tell()))
            f.close()
        return [[f.hexdigest() for f in plan_files] for plan_files in self.files]

    def abort(self) -> None:
        for f in (f for plan_files in self.files for f in plan_files):
            f.close()


def commit(out: Path, finals: Sequence[Path], temps: Sequence[Path], expected: layout.GGUFLayout,
           heads: Sequence[bytes], digests: Sequence[str], inputs: str) -> None:
    """Check each written shard against its layout, record them in the manifest, and rename into place."""
    for shard, temp in enumerate(temps):
        layout.validate(temp, expected, shard, heads[shard])
    manifest.record(out, {f.name: (expected.shards[k][1], digests[k]) for k, f in enumerate(finals)}, inputs)
    for temp, final in zip(temps, finals, strict=True):
        os.replace(temp, final)
