"""Installing what the steps need: the notebooks' install cell on Colab and Kaggle, and llama.cpp anywhere.

``python -m unsloth_nb.install llama-cpp`` (what ``make`` runs first) compiles llama-cpp-python once with
llama.cpp's portable flags (``gguf.llamacpp.PORTABLE_CMAKE_ARGS``: no ``-march=native``, no AMX, whose
weight-repacking path crashes on Intel AMX CPUs) and installs that wheel; the tools the tests use come out of
the same compile. It runs before the package's own requirements are installed, so it imports only the
standard library at module level.

On Colab and Kaggle, :func:`install` adds the requirements with the preinstalled CUDA torch held at its
version, the vLLM release that fits that torch, the GPU and the driver (or none, with the reason), and on
request llama.cpp's server in the same portable build.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unsloth_nb.errors import UserError
from unsloth_nb.gguf import llamacpp

if TYPE_CHECKING:
    from unsloth_nb.runtime import Runtime

VLLM_FOR_TORCH: dict[str, str] = {
    "2.6": ">=0.8.0,<0.9",
    "2.7": ">=0.9.0,<0.10.2",
    "2.8": ">=0.10.2,<0.11.1",
    "2.9": ">=0.11.1",
}
"""vLLM releases whose exact torch pin falls in each torch minor release (vLLM pins torch with ``==``). The
install also holds torch at its installed version, so pip picks, within the range, the release that pins
exactly that torch or refuses; it never replaces torch. Torch releases not listed leave the choice to pip."""

DRIVER_FOR_CUDA: dict[int, int] = {11: 450, 12: 525, 13: 580}
"""Oldest NVIDIA driver (major version) that runs each CUDA major release (minor-version compatibility)."""

LLAMA_CPP_REQUIREMENT = f"llama-cpp-python[server]=={llamacpp.LLAMA_CPP_PYTHON_VERSION}"
"""llama.cpp's Python server: the portable wheel itself is installed first (:func:`install_llama_cpp`), so this
line only adds the server's own dependencies."""


@dataclass(frozen=True)
class VllmChoice:
    """The vLLM requirement to install on this machine, or None with the reason."""

    requirement: str | None
    """pip requirement, e.g. "vllm>=0.10.2,<0.11.1"; None when vLLM cannot run here."""
    reason: str
    """One sentence on why."""


def choose_vllm(runtime: Runtime, torch_version: str | None, torch_cuda: str | None,
                driver: str | None) -> VllmChoice:
    """Pick the vLLM requirement from the GPUs, the installed torch (version and CUDA build) and the driver.

    Pure, so that each platform's choice is tested without it: ``detect_torch()`` and ``detect_driver()``
    read the real values."""
    from unsloth_nb.serve import VLLM_MIN_CAPABILITY

    if not runtime.gpus:
        return VllmChoice(None, "no CUDA GPU: serve the GGUF with llama.cpp instead")
    old = [g for g in runtime.gpus if g.capability < VLLM_MIN_CAPABILITY]
    if old:
        major, minor = old[0].capability
        return VllmChoice(None, f"{old[0].name} has compute capability {major}.{minor}, below vLLM's "
                                f"{VLLM_MIN_CAPABILITY[0]}.{VLLM_MIN_CAPABILITY[1]}: serve the GGUF with llama.cpp")
    if not torch_version or not torch_cuda:
        return VllmChoice(None, "torch with CUDA is not installed, and installing vLLM would replace it")
    cuda_major = int(torch_cuda.split(".")[0])
    need = DRIVER_FOR_CUDA.get(cuda_major)
    if driver and need and int(driver.split(".")[0]) < need:
        return VllmChoice(None, f"NVIDIA driver {driver} is older than {need}, which CUDA {cuda_major} (this torch's "
                                f"build) needs: serve the GGUF with llama.cpp")
    minor_release = ".".join(torch_version.split("+")[0].split(".")[:2])
    bounds = VLLM_FOR_TORCH.get(minor_release, "")
    return VllmChoice(f"vllm{bounds}", f"the vLLM release that pins torch {torch_version.split('+')[0]} "
                                       f"(CUDA {torch_cuda}, driver {driver or 'unknown'})")


def detect_torch() -> tuple[str | None, str | None]:
    """(torch version, CUDA version it was built with) without importing torch into this process."""
    code = "import torch; print(torch.__version__); print(torch.version.cuda or '')"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    except (OSError, subprocess.SubprocessError):
        return None, None
    version, _, cuda = out.stdout.strip().partition("\n")
    return version.strip() or None, cuda.strip() or None


def detect_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, e.g. "550.54.15"; None without one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


def install_commands(requirements: str | os.PathLike, constraints: str | os.PathLike,
                     vllm: VllmChoice | None, llama_cpp: bool = False) -> list[list[str]]:
    """The pip command lines the install cell runs: the requirements, then vLLM when chosen and llama.cpp's
    server dependencies when asked, each under ``constraints`` (which holds torch at its installed version)."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--constraint", str(constraints)]
    commands = [[*pip, "--requirement", str(requirements)]]
    if vllm is not None and vllm.requirement:
        commands.append([*pip, vllm.requirement])
    if llama_cpp:
        commands.append([*pip, LLAMA_CPP_REQUIREMENT])
    return commands


def install_llama_cpp(python: str = sys.executable) -> None:
    """Compile (once, cached) and install the portable llama-cpp-python build into ``python``'s environment.

    Nothing is reinstalled when the installed libraries already are that build's."""
    wheel = llamacpp.wheel()
    if python == sys.executable and llamacpp.installed_is_portable_build():
        return
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)],
                   check=True)


def install(requirements: str | os.PathLike, *, vllm: bool = True, llama_cpp: bool = False) -> VllmChoice | None:
    """Colab/Kaggle install: ``requirements``, the vLLM release chosen by :func:`choose_vllm` (when ``vllm``)
    and llama.cpp's server in the portable build (when ``llama_cpp``), with torch held at its installed version
    so that pip can never replace it."""
    from unsloth_nb.runtime import detect

    version, cuda = detect_torch()
    if version is None:
        raise UserError("torch is not installed in this runtime. Fix: use a Colab or Kaggle GPU runtime (they ship "
                        "torch), or install torch for your machine first.")
    choice = choose_vllm(detect(), version, cuda, detect_driver()) if vllm else None
    if choice is not None:
        print(f"vLLM: {choice.requirement or 'not installed'} ({choice.reason})")
    if llama_cpp:
        install_llama_cpp()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={version.split('+')[0]}\n")
    try:
        for command in install_commands(requirements, f.name, choice, llama_cpp):
            subprocess.run(command, check=True)
    finally:
        os.unlink(f.name)
    return choice


def main(argv: list[str] | None = None) -> int:
    """``python -m unsloth_nb.install llama-cpp``: the portable llama.cpp build, compiled once and installed."""
    parser = argparse.ArgumentParser(prog="python -m unsloth_nb.install",
                                     description="Install the parts unsloth_nb builds itself.")
    parser.add_argument("what", choices=["llama-cpp"], help="llama-cpp: the portable llama-cpp-python build")
    parser.parse_args(argv)
    try:
        install_llama_cpp()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON_VERSION}: portable build from {llamacpp.build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
