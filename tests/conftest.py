"""Shared pytest fixtures: tiny offline models with real tokenizers (built once, cached)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from unsloth_nb import fixtures

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach the Hugging Face Hub


@pytest.fixture(scope="session")
def llama3_dir() -> Path:
    """Llama architecture, Llama-3 BPE tokenizer, untied embeddings, llama3 rope scaling."""
    return fixtures.build_model("llama3")


@pytest.fixture(scope="session")
def llama2_dir() -> Path:
    """Llama architecture, SentencePiece tokenizer with tokenizer.model."""
    return fixtures.build_model("llama2")


@pytest.fixture(scope="session")
def qwen2_dir() -> Path:
    """Qwen2 architecture with q/k/v biases and tied embeddings."""
    return fixtures.build_model("qwen2")


@pytest.fixture(scope="session", params=fixtures.KINDS)
def any_model_dir(request: pytest.FixtureRequest) -> Path:
    """Each fixture model in turn."""
    return fixtures.build_model(request.param)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size) -> folder``: a real filesystem of ``size`` bytes (root only, as CI runs), unmounted after."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        assert done.returncode == 0, f"mounting a tmpfs needs root: {done.stderr}"
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


@pytest.fixture(scope="session", autouse=True)
def no_orphan_servers():
    """At the end of the session no server started by any test may still run."""
    yield
    from unsloth_nb import serve

    leaked = serve.running_servers()
    serve.stop_all()
    assert not leaked, f"servers left running: {leaked}"


TMP_PEAK = 3.5e9
"""Bytes a full run holds at once under the temp folder (2.9 GB measured, with pyproject's retention policy)."""


def pytest_report_header(config) -> list[str]:
    """Free space where the tests write, so that a run on a nearly full disk says why it fails."""
    tmp = tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free
    line = f"free disk in {tmp}: {free / 1e9:.1f} GB (a full run needs about {TMP_PEAK / 1e9:.1f} GB there)"
    if free < TMP_PEAK:
        line += " -- WARNING: too little; tests that write models and GGUFs will fail with 'No space left on device'"
    return [line]


RELIABILITY: Counter = Counter()
"""What the reliability tests did: bad-input cases, fuzzed inputs, faults injected by kind, user files checked
and lost."""


@pytest.fixture(scope="session")
def ledger() -> Counter:
    """Tests count what they tried here; the summary at the end of the run prints it."""
    return RELIABILITY


def pytest_terminal_summary(terminalreporter) -> None:
    if not RELIABILITY:
        return
    faults = {k[len("fault: "):]: v for k, v in RELIABILITY.items() if k.startswith("fault: ")}
    terminalreporter.write_sep("-", "reliability summary")
    terminalreporter.write_line(f"bad-input cases tried: {RELIABILITY['cases']}")
    terminalreporter.write_line(f"fuzzed inputs read: {RELIABILITY['fuzzed inputs']} (each a success or a UserError)")
    terminalreporter.write_line(f"faults injected: {sum(faults.values())} ("
                                + ", ".join(f"{k}: {v}" for k, v in sorted(faults.items())) + ")")
    terminalreporter.write_line(f"user files checked: {RELIABILITY['files checked']}, "
                                f"files lost: {RELIABILITY['files lost']}")
