"""Runtime detection: platforms from faked environments, measured RAM and disk, bf16 by capability."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unsloth_nb import runtime
from unsloth_nb.runtime import GPU, Runtime

T4 = GPU(0, "Tesla T4", 15 * 2**30, 14 * 2**30, (7, 5))
T4_1 = GPU(1, "Tesla T4", 15 * 2**30, 15 * 2**30, (7, 5))
A100 = GPU(0, "NVIDIA A100-SXM4-40GB", 40 * 2**30, 39 * 2**30, (8, 0))


@pytest.fixture
def clean_env(monkeypatch):
    """The test process's environment without any platform hints."""
    for name in list(os.environ):
        if name.startswith(("COLAB_", "KAGGLE_")) or name == runtime.ROOT_ENV:
            monkeypatch.delenv(name)
    return monkeypatch


def test_local_by_default(clean_env, tmp_path):
    clean_env.setenv(runtime.ROOT_ENV, str(tmp_path))
    assert runtime.detect(gpus=()).platform == "local"


def test_colab_from_any_colab_variable(clean_env, tmp_path):
    clean_env.setenv(runtime.ROOT_ENV, str(tmp_path))
    clean_env.setenv("COLAB_RELEASE_TAG", "release-colab_20260101-060000_RC00")
    rt = runtime.detect(gpus=(T4,))
    assert rt.platform == "colab"
    assert not rt.supports_bf16


def test_kaggle_needs_variable_and_working_folder(clean_env, tmp_path):
    clean_env.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    # Kaggle variable on a machine without /kaggle/working (a laptop with Kaggle credentials): local.
    assert runtime.detect(root=tmp_path, gpus=()).platform == "local"
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    rt = runtime.detect(root=tmp_path, gpus=(T4, T4))
    assert rt.platform == "kaggle"
    assert rt.kaggle_working == tmp_path / "kaggle" / "working"
    # The folder alone, without the variable, is not Kaggle either.
    clean_env.delenv("KAGGLE_KERNEL_RUN_TYPE")
    assert runtime.detect(root=tmp_path, gpus=()).platform == "local"


def test_root_from_environment_variable(clean_env, tmp_path):
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    env = {"KAGGLE_KERNEL_RUN_TYPE": "Batch", runtime.ROOT_ENV: str(tmp_path)}
    assert runtime.detect_platform(env) == "kaggle"
    assert runtime.detect(environ=env, gpus=()).root == tmp_path


def test_ram_and_cpus_are_measured(clean_env):
    rt = runtime.detect(gpus=())
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = int(meminfo["MemTotal"].split()[0]) * 1024
    assert rt.total_ram == total
    assert 0 < rt.available_ram <= rt.total_ram
    assert rt.cpu_count == len(os.sched_getaffinity(0))


def test_bf16_only_from_compute_capability_8():
    assert not T4.supports_bf16
    assert A100.supports_bf16
    base = dict(platform="local", total_ram=1, available_ram=1, cpu_count=1)
    assert not Runtime(**base).supports_bf16
    assert not Runtime(**base, gpus=(T4, T4)).supports_bf16
    assert Runtime(**base, gpus=(A100,)).supports_bf16
    assert not Runtime(**base, gpus=(A100, T4)).supports_bf16


def test_free_disk_of_a_path_that_does_not_exist_yet(tmp_path):
    missing = tmp_path / "not" / "yet" / "there"
    assert runtime.existing_ancestor(missing) == tmp_path
    assert runtime.free_disk(missing) > 0
    # Same filesystem, measured twice: the figures agree within what others write meanwhile.
    assert abs(runtime.free_disk(missing) - shutil.disk_usage(tmp_path).free) < 10**9


def test_kaggle_working_counts_its_20_gb_limit(clean_env, tmp_path):
    working = tmp_path / "kaggle" / "working"
    working.mkdir(parents=True)
    (tmp_path / "tmp").mkdir()
    rt = runtime.detect(environ={"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, root=tmp_path, gpus=(T4, T4))
    before = rt.free_disk(working / "out")
    assert before == min(runtime.free_disk(working), runtime.KAGGLE_WORKING_LIMIT)
    (working / "existing.bin").write_bytes(b"\0" * 1_000_000)
    if runtime.free_disk(working) > runtime.KAGGLE_WORKING_LIMIT:
        assert rt.free_disk(working) == runtime.KAGGLE_WORKING_LIMIT - 1_000_000
    assert rt.is_kept(working / "model.gguf")
    assert not rt.is_kept(tmp_path / "tmp" / "model.gguf")
    assert rt.volume(working) != rt.volume(tmp_path / "tmp")
    assert rt.volume(working / "a") == rt.volume(working / "b" / "c")


def test_given_disk_figures_answer_by_longest_folder():
    rt = Runtime("kaggle", 32 * 10**9, 30 * 10**9, 4, (T4, T4), Path("/"),
                 disks={"/": 50 * 10**9, "/kaggle/working": 20 * 10**9})
    assert rt.free_disk("/kaggle/working/out/x.gguf") == 20 * 10**9
    assert rt.free_disk("/tmp/out") == 50 * 10**9
    assert rt.volume("/kaggle/working/a") == "/kaggle/working"
    assert rt.volume("/tmp") == "/"


def test_nvidia_smi_output_is_parsed():
    text = "0, Tesla T4, 15360, 15095, 7.5\n1, NVIDIA H100 80GB HBM3, 81559, 81000, 9.0\n"
    gpus = runtime.parse_nvidia_smi(text)
    assert [g.name for g in gpus] == ["Tesla T4", "NVIDIA H100 80GB HBM3"]
    assert gpus[0].total_vram == 15360 * 2**20 and gpus[0].capability == (7, 5)
    assert [g.supports_bf16 for g in gpus] == [False, True]
    assert runtime.parse_nvidia_smi("0, Tesla T4, 15360, 15095, [N/A]\n") is None


def test_summary_renders_as_text_and_html(clean_env, tmp_path):
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    rt = runtime.detect(environ={"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, root=tmp_path, gpus=(T4, T4_1))
    text = str(rt)
    assert "kaggle" in text and "Tesla T4" in text and "compute 7.5" in text and "bf16 no" in text
    assert "not kept" in text
    page = rt._repr_html_()
    assert page.startswith("<table>") and page.count("<tr>") == len(rt.rows())
    assert "GPU 1" in page


def test_package_imports_without_torch(tmp_path):
    # A fake "torch" that fails on import: detection and the summary must not need it.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    code = (
        "import unsloth_nb.runtime as r, unsloth_nb.plan as p, sys; "
        "rt = r.detect(); print(rt.platform, 'torch' in sys.modules and sys.modules['torch'] is not None)"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"
