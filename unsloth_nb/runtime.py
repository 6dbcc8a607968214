"""Where we run: Colab, Kaggle or a local machine; its RAM, CPUs, GPUs and free disk per folder.

Every step plans against these numbers before it writes a byte. Detection never needs torch: GPUs are
read from ``nvidia-smi`` when it exists (no CUDA context is created in this process), else from torch if
it is installed. ``supports_bf16`` trusts only the compute capability (>= 8.0): a T4 (7.5) tells torch it
supports bf16 because torch emulates it, and such a model then runs slowly or fails in vLLM.
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT_ENV = "UNSLOTH_NB_ROOT"
"""Environment variable that moves the filesystem root used to find /kaggle/working, /content and /tmp
(tests point it at a temporary folder that holds a fake ``kaggle/working``)."""

KAGGLE_WORKING_LIMIT = 20 * 10**9
"""Kaggle keeps at most 20 GB of output in /kaggle/working, however much the disk under it has free."""

RAM_SHARE = {"colab": 0.75, "kaggle": 0.9, "local": 0.9}
"""Largest share of the available RAM a step may plan to use: Colab kills the kernel without a word when full."""

BASE_RAM = 480 * 10**6
"""Resident memory of a step's Python process before the first tensor (interpreter, torch, transformers:
465 MB measured on CPU)."""


@dataclass(frozen=True)
class GPU:
    """One CUDA device as seen at detection time."""

    index: int
    """CUDA device index."""
    name: str
    """Marketing name, e.g. "Tesla T4" or "NVIDIA H100 80GB HBM3"."""
    total_vram: int
    """Memory on the card, in bytes."""
    free_vram: int
    """Memory free when detected, in bytes (other processes and this one may hold some)."""
    capability: tuple[int, int]
    """CUDA compute capability (major, minor): T4 is (7, 5), A100 (8, 0), H100 (9, 0)."""

    @property
    def supports_bf16(self) -> bool:
        """True only for compute capability >= 8.0, where bf16 runs natively (never emulated)."""
        return self.capability >= (8, 0)


@dataclass(frozen=True)
class Runtime:
    """The machine a notebook or command runs on; build it with :func:`detect`."""

    platform: str
    """"colab", "kaggle" or "local"."""
    total_ram: int
    """Installed RAM, in bytes."""
    available_ram: int
    """RAM the OS can give to a new allocation right now, in bytes."""
    cpu_count: int
    """CPU cores this process may use."""
    gpus: tuple[GPU, ...] = ()
    """CUDA devices; empty on a CPU machine."""
    root: Path = Path("/")
    """Filesystem root under which /kaggle/working, /content and /tmp are looked up."""
    disks: Mapping[str, int] | None = field(default=None, repr=False)
    """Free bytes per folder to use instead of measuring (for what-if plans and tests); the longest folder
    that contains a path answers for it. None measures the real filesystem."""

    @property
    def supports_bf16(self) -> bool:
        """True when there is a GPU and every GPU runs bf16 natively (compute capability >= 8.0)."""
        return bool(self.gpus) and all(gpu.supports_bf16 for gpu in self.gpus)

    @property
    def kaggle_working(self) -> Path:
        """Kaggle's kept output folder (its content survives the session, up to 20 GB)."""
        return self.root / "kaggle" / "working"

    @property
    def tmp_dir(self) -> Path:
        """Scratch space: large on Colab and Kaggle, but deleted when the session ends."""
        return self.root / "tmp"

    @property
    def default_dir(self) -> Path:
        """Where outputs go when nobody asked: /kaggle/working, /content on Colab, else the current folder."""
        if self.platform == "kaggle":
            return self.kaggle_working
        if self.platform == "colab":
            return self.root / "content"
        return Path.cwd()

    def is_kept(self, path: str | os.PathLike) -> bool:
        """False for folders a hosted platform deletes when the session ends: on Kaggle all but
        /kaggle/working; on Colab all but a mounted Google Drive (/content/drive). Local folders are kept."""
        p = Path(os.path.abspath(path))
        if self.platform == "kaggle":
            return _is_under(p, self.kaggle_working)
        if self.platform == "colab":
            return _is_under(p, self.root / "content" / "drive")
        return True

    def volume(self, path: str | os.PathLike) -> str:
        """A key equal for two paths exactly when writing to one uses up the free space of the other."""
        p = Path(os.path.abspath(path))
        if self.disks is not None:
            return str(_longest_key(self.disks, p))
        if self.platform == "kaggle" and _is_under(p, self.kaggle_working):
            return "kaggle-working"
        return f"dev:{os.stat(existing_ancestor(p)).st_dev}"

    def free_disk(self, path: str | os.PathLike) -> int:
        """Bytes that can still be written under ``path`` (which need not exist yet).

        Measured on the nearest existing folder above it; on Kaggle, /kaggle/working also counts against
        its 20 GB output limit, minus what is already stored there.
        """
        p = Path(os.path.abspath(path))
        if self.disks is not None:
            return int(self.disks[str(_longest_key(self.disks, p))])
        free = free_disk(p)
        if self.platform == "kaggle" and _is_under(p, self.kaggle_working):
            free = min(free, max(0, KAGGLE_WORKING_LIMIT - _tree_size(self.kaggle_working)))
        return free

    def rows(self) -> list[tuple[str, str]]:
        """The summary as (label, value) pairs, shared by the text and HTML renderings."""
        rows = [
            ("platform", self.platform),
            ("RAM", f"{gb(self.available_ram)} available of {gb(self.total_ram)}"),
            ("CPUs", str(self.cpu_count)),
        ]
        if not self.gpus:
            rows.append(("GPU", "none"))
        for gpu in self.gpus:
            major, minor = gpu.capability
            rows.append((
                f"GPU {gpu.index}",
                f"{gpu.name}, {gb(gpu.free_vram)} free of {gb(gpu.total_vram)}, compute {major}.{minor}, "
                f"bf16 {'yes' if gpu.supports_bf16 else 'no (use float16)'}",
            ))
        for label, folder in self._disk_folders():
            kept = "" if self.is_kept(folder) else " (not kept after the session)"
            rows.append((f"disk {label}", f"{gb(self.free_disk(folder))} free{kept}"))
        return rows

    def _disk_folders(self) -> list[tuple[str, Path]]:
        folders = [(str(self.kaggle_working), self.kaggle_working)] if self.platform == "kaggle" else []
        if self.platform != "kaggle":
            folders.append((str(self.default_dir), self.default_dir))
        folders.append((str(self.tmp_dir), self.tmp_dir))
        return folders

    def __str__(self) -> str:
        width = max(len(label) for label, _ in self.rows())
        return "\n".join(f"{label:<{width}}  {value}" for label, value in self.rows())

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
            f"{html.escape(v)}</td></tr>"
            for k, v in self.rows()
        )
        return f"<table>{cells}</table>"


def gb(n: float) -> str:
    """Bytes as decimal gigabytes for people ("12.3 GB"; small amounts in MB)."""
    if abs(n) < 10**9:
        return f"{n / 10**6:.0f} MB" if abs(n) >= 10**6 else f"{n / 10**6:.1f} MB"
    return f"{n / 10**9:.1f} GB"


def ram_budget(rt: Runtime) -> int:
    """The most RAM any step may plan for on this runtime (see RAM_SHARE)."""
    return int(rt.available_ram * RAM_SHARE.get(rt.platform, 0.9))


def ram_problem(step: str, need: int, rt: Runtime) -> str:
    """One sentence: how much ``step`` needs, what the runtime has, how much is missing."""
    share = RAM_SHARE.get(rt.platform, 0.9)
    budget = ram_budget(rt)
    return (f"{step} needs about {gb(need)} of RAM at its peak; this {rt.platform} runtime has "
            f"{gb(rt.available_ram)} available and plans use at most {int(share * 100)}% of it ({gb(budget)}, "
            f"{gb(need - budget)} short).")


def require_ram(step: str, need: int, rt: Runtime | None = None) -> None:
    """Refuse (UserError) before a step whose peak RAM is over this runtime's budget."""
    from unsloth_nb.errors import UserError

    rt = rt or detect()
    if need > ram_budget(rt):
        raise UserError(ram_problem(step, need, rt) + " Fix: use a machine with more RAM, or do less in one "
                        "call (fewer GGUF methods at once).")


_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
               "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from "5GB", "500M", "2G", "1.5GiB" or a plain number: K/M/G/T are powers of 1000, as transformers
    reads ``max_shard_size`` and llama.cpp ``--split-max-size``; KiB/MiB/GiB/TiB powers of 1024. The one size
    parser; ``what`` names the setting in the error."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?)B?\s*", str(text).upper())
    if not match or match.group(2) == "I":
        from unsloth_nb.errors import UserError

        raise UserError(f"{what} {text!r} is not a size. Fix: write it like 5GB, 500MB, 2G or 1000000.")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def detect_platform(environ: Mapping[str, str] | None = None, root: str | os.PathLike | None = None) -> str:
    """"colab" when any ``COLAB_*`` variable is set; "kaggle" when ``KAGGLE_KERNEL_RUN_TYPE`` is set and
    ``<root>/kaggle/working`` exists (Kaggle CLI credentials on a laptop are not Kaggle); else "local"."""
    env = os.environ if environ is None else environ
    if any(name.startswith("COLAB_") for name in env):
        return "colab"
    if env.get("KAGGLE_KERNEL_RUN_TYPE") and (_root(env, root) / "kaggle" / "working").is_dir():
        return "kaggle"
    return "local"


def detect_gpus() -> tuple[GPU, ...]:
    """CUDA devices from ``nvidia-smi`` (no CUDA context is created), else from torch when installed.

    Without nvidia-smi, torch is asked only if it is already imported or a GPU driver is present (NVIDIA
    or ROCm): importing torch takes seconds, too long for a CPU machine to learn it has no GPU."""
    smi = shutil.which("nvidia-smi")
    if smi:
        gpus = _gpus_from_nvidia_smi(smi)
        if gpus is not None:
            return gpus
    if "torch" in sys.modules or os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/kfd"):
        return _gpus_from_torch()
    return ()


def detect(
    *,
    environ: Mapping[str, str] | None = None,
    root: str | os.PathLike | None = None,
    gpus: tuple[GPU, ...] | None = None,
) -> Runtime:
    """Describe this machine. ``environ``, ``root`` and ``gpus`` replace what would be read from the
    process environment, ``$UNSLOTH_NB_ROOT`` (else "/") and the GPUs, so other platforms can be faked."""
    import psutil

    env = os.environ if environ is None else environ
    memory = psutil.virtual_memory()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return Runtime(
        platform=detect_platform(env, root),
        total_ram=int(memory.total),
        available_ram=int(memory.available),
        cpu_count=cpus,
        gpus=detect_gpus() if gpus is None else tuple(gpus),
        root=_root(env, root),
    )


def summary() -> Runtime:
    """One call for a notebook cell: the detected runtime, shown as a small table (or text in a terminal)."""
    return detect()


def existing_ancestor(path: str | os.PathLike) -> Path:
    """The path itself if it exists, else the nearest folder above it that does."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_disk(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds ``path`` (or would hold it: the nearest existing ancestor)."""
    return int(shutil.disk_usage(existing_ancestor(path)).free)


def _root(env: Mapping[str, str], root: str | os.PathLike | None) -> Path:
    return Path(root if root is not None else env.get(ROOT_ENV) or "/")


def _is_under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _longest_key(disks: Mapping[str, int], path: Path) -> str:
    matches = [key for key in disks if _is_under(path, Path(os.path.abspath(key)))]
    if not matches:
        raise KeyError(f"no free-disk figure given for {path} (known: {', '.join(disks)})")
    return max(matches, key=lambda key: len(Path(os.path.abspath(key)).parts))


def _tree_size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def _gpus_from_nvidia_smi(smi: str) -> tuple[GPU, ...] | None:
    query = "index,name,memory.total,memory.free,compute_cap"
    try:
        out = subprocess.run(
            [smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(out)


def parse_nvidia_smi(text: str) -> tuple[GPU, ...] | None:
    """GPUs from ``nvidia-smi --query-gpu=index,name,memory.total,memory.free,compute_cap
    --format=csv,noheader,nounits`` output (MiB); None when a line cannot be read (old drivers)."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            index, total, free = int(parts[0]), int(parts[-3]), int(parts[-2])
            major, minor = (int(x) for x in parts[-1].split("."))
        except (ValueError, IndexError):
            return None
        name = ",".join(parts[1:-3])
        gpus.append(GPU(index, name, total * 2**20, free * 2**20, (major, minor)))
    return tuple(gpus)


def _gpus_from_torch() -> tuple[GPU, ...]:
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(GPU(i, props.name, int(total), int(free), (props.major, props.minor)))
    return tuple(gpus)
