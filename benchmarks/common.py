"""Run one step in a fresh process and measure its wall time and peak memory.

Peak memory is the larger of the process's own high-water mark (ru_maxrss) and the peak sum of proportional
set sizes (PSS) over the process and its children, sampled every 0.5 s, so that work done in worker
processes (the GGUF converter forks some) is counted once and in full.

On Linux a child's ru_maxrss starts at its parent's high-water mark (exec carries the old memory's mark over),
so a benchmark that built a fixture in-process would report its own size for every step. The step therefore
runs under a small launcher process, which starts it and hands back the step's own ru_maxrss."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

MAKE_ADAPTER = """
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
config = LoraConfig(r=16, lora_alpha=16, init_lora_weights=False,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
get_peft_model(model, config).save_pretrained({adapter!r})
"""
"""Child-process code: a rank-16 LoRA adapter with random non-zero weights on all seven projections."""


def cpu_name() -> str:
    """The host CPU's model name, for the tables (benchmark figures name the host they ran on)."""
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


@dataclass
class Measurement:
    """Wall time and peak resident memory of one child process."""

    label: str
    seconds: float
    peak_rss_mb: float
    returncode: int

    def row(self) -> str:
        return f"| {self.label} | {self.seconds:.1f} s | {self.peak_rss_mb:.0f} MB |"


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    pids += _tree(int(child))
    except OSError:
        pass
    return pids


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


LAUNCHER = """
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""
"""Starts the step (argv[2:]) and writes its own ru_maxrss (KiB) to argv[1]: its high-water mark begins at this
small launcher's, not at the benchmark's."""


def _run(label: str, argv: list[str], env: dict[str, str] | None) -> Measurement:
    import tempfile

    report = tempfile.NamedTemporaryFile(prefix="maxrss-", delete=False)
    report.close()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, report.name, *argv], env={**os.environ, **(env or {})})
    peak_pss = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak_pss[0] = max(peak_pss[0], sum(_pss_kb(p) for p in _tree(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, _ = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    returncode = os.waitstatus_to_exitcode(status)
    with open(report.name) as f:
        own = int(f.read() or 0)
    os.unlink(report.name)
    if returncode != 0:
        raise SystemExit(f"{label} failed with exit status {returncode}")
    return Measurement(label, seconds, max(own, peak_pss[0]) / 1024, returncode)


def measure(label: str, code: str, env: dict[str, str] | None = None) -> Measurement:
    """Run ``python -c code`` and report wall time and peak memory (see the module docstring)."""
    return _run(label, [sys.executable, "-c", code], env)


def measure_command(label: str, argv: list[str], env: dict[str, str] | None = None) -> Measurement:
    """Like :func:`measure` for any command line."""
    return _run(label, argv, env)


def table(title: str, rows: list[Measurement], reference: Measurement, ours: Measurement) -> str:
    """A markdown table plus the ratios the issues ask for (ours / reference)."""
    lines = [f"### {title}", "", "| run | wall | peak RSS |", "| --- | --- | --- |", *(m.row() for m in rows), "",
             f"wall-time ratio (ours / reference): {ours.seconds / reference.seconds:.2f}; "
             f"peak RSS: ours {ours.peak_rss_mb:.0f} MB vs reference {reference.peak_rss_mb:.0f} MB", ""]
    return "\n".join(lines)
