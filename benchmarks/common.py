"""Run one step in a fresh process and measure its wall time and peak RSS (the process's own high-water mark)."""

from __future__ import annotations

import os
import subprocess
import sys
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


def measure(label: str, code: str, env: dict[str, str] | None = None) -> Measurement:
    """Run ``python -c code`` and report wall time and ru_maxrss of that process (its children excluded).

    The child's high-water mark includes the parent's resident memory at fork time, so keep the calling
    process small (do heavy work such as planning in a child too)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise SystemExit(f"{label} failed with exit status {returncode}")
    return Measurement(label, seconds, usage.ru_maxrss / 1024, returncode)


def measure_command(label: str, argv: list[str], env: dict[str, str] | None = None) -> Measurement:
    """Like :func:`measure` for any command line."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise SystemExit(f"{label} failed with exit status {returncode}")
    return Measurement(label, time.perf_counter() - started, usage.ru_maxrss / 1024, returncode)


def table(title: str, rows: list[Measurement], reference: Measurement, ours: Measurement) -> str:
    """A markdown table plus the ratios the issues ask for (ours / reference)."""
    lines = [f"### {title}", "", "| run | wall | peak RSS |", "| --- | --- | --- |", *(m.row() for m in rows), "",
             f"wall-time ratio (ours / reference): {ours.seconds / reference.seconds:.2f}; "
             f"peak RSS: ours {ours.peak_rss_mb:.0f} MB vs reference {reference.peak_rss_mb:.0f} MB", ""]
    return "\n".join(lines)
