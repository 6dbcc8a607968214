"""Run one step in a fresh process and measure its wall time and peak memory.

Peak memory is the larger of the process's own high-water mark (ru_maxrss) and the peak sum of proportional
set sizes (PSS) over the process and its children, sampled every 0.5 s, so that work done in worker
processes (the GGUF converter forks some) is counted once and in full."""

from __future__ import annotations

import os
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


def _run(label: str, argv: list[str], env: dict[str, str] | None) -> Measurement:
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})})
    peak_pss = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak_pss[0] = max(peak_pss[0], sum(_pss_kb(p) for p in _tree(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise SystemExit(f"{label} failed with exit status {returncode}")
    return Measurement(label, seconds, max(usage.ru_maxrss, peak_pss[0]) / 1024, returncode)


def measure(label: str, code: str, env: dict[str, str] | None = None) -> Measurement:
    """Run ``python -c code`` and report wall time and peak memory (see the module docstring).

    The child's high-water mark includes the parent's resident memory at fork time, so keep the calling
    process small (do heavy work such as planning in a child too)."""
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
