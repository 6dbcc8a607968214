"""llama.cpp as an optional backend and as our reference: its sources, and one portable build of it.

The PyPI package ``llama-cpp-python`` ships only an sdist, and that sdist vendors the whole llama.cpp
tree: the reference converter ``convert_hf_to_gguf.py``, a ``gguf-py`` newer than PyPI's, the
quantizer sources and real vocabularies under ``models/``. We fetch that one archive from PyPI
(``pip download``), cache it, and unpack what we need.

:func:`build` compiles the same archive once, with :data:`PORTABLE_CMAKE_ARGS`, into a wheel of
llama-cpp-python (what ``make`` and the notebooks' local installs put into the environment) and, in the
same compile, llama.cpp's own tools (``llama-quantize``, ``llama-imatrix``, ``llama-perplexity``: the
references of the tests and benchmarks). pip's default build compiles for the CPU it runs on
(``-march=native``), and on CPUs with Intel AMX that build crashes in its AMX weight-repacking path on the
first decode of any model; the portable build has no AMX code and runs on every x86-64 CPU with AVX2.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from unsloth_nb.errors import UserError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The llama-cpp-python release whose vendored llama.cpp we use as reference (pinned in requirements-cpu.txt)."""

_SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
_VENDOR_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
# Parts of the vendored tree we unpack: the converter and its package, gguf-py, vocabularies and
# chat templates. The C sources stay in the archive unless someone builds the tools.
_WANTED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "models/", "LICENSE")


PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
    "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAVA_BUILD=OFF",
)
"""How we compile llama.cpp: for x86-64 with AVX2 (every x86 CPU of the last decade) instead of the build
machine's own CPU, and without AMX, whose repacking path segfaults on AMX CPUs. The tools are built in the
same compile (the multimodal library, which llama-cpp-python would build a second time beside them, is
left out: nothing here uses it). On other CPU families the x86 flags do not apply."""

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
"""llama.cpp's programs that tests and benchmarks run as references."""


def cache_dir() -> Path:
    """Where unsloth_nb keeps downloads and built fixtures (``$UNSLOTH_NB_CACHE`` or ~/.cache/unsloth_nb)."""
    root = os.environ.get("UNSLOTH_NB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unsloth_nb")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sdist_archive() -> Path:
    """Path of the llama-cpp-python sdist, downloaded from PyPI with pip on first use."""
    target = cache_dir() / "sdist"
    archive = target / _SDIST_NAME
    if archive.is_file():
        return archive
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--dest", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / _SDIST_NAME
        if result.returncode != 0 or not got.is_file():
            raise UserError(
                f"Could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source archive from PyPI "
                f"(pip said: {result.stderr.strip()[-300:] or 'nothing'}). It holds llama.cpp's reference "
                f"converter and vocabularies. Fix: check the connection to PyPI, or place {_SDIST_NAME} "
                f"in {target} by hand."
            )
        os.replace(got, archive)
    return archive


def source_tree() -> Path:
    """The vendored ``llama.cpp`` folder (converter, gguf-py, models/), unpacked once into the cache."""
    dest = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    stamp = f"{LLAMA_CPP_PYTHON_VERSION} {' '.join(_WANTED)}"  # a tree unpacked with fewer parts is unpacked again
    if (dest / ".complete").is_file() and (dest / ".complete").read_text() == stamp:
        return dest
    archive = sdist_archive()
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache_dir()))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.name.startswith(_VENDOR_PREFIX) or not (member.isfile() or member.isdir()):
                    continue
                rel = member.name[len(_VENDOR_PREFIX):]
                if not rel.startswith(_WANTED):
                    continue
                out = tmp / rel
                if member.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        (tmp / ".complete").write_text(stamp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def vocab_file(name: str) -> Path:
    """A vocabulary GGUF from llama.cpp's ``models/`` (e.g. ``llama-bpe`` -> ggml-vocab-llama-bpe.gguf)."""
    return source_tree() / "models" / f"ggml-vocab-{name}.gguf"


def chat_template(name: str) -> str:
    """A real chat template from llama.cpp's ``models/templates/`` (file name without .jinja)."""
    return (source_tree() / "models" / "templates" / f"{name}.jinja").read_text()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so that parallel processes (test workers) build a cached thing once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_dir() -> Path:
    """Where the portable build lives: named by the release and the CMake arguments, so that a change of
    either builds anew instead of reusing a build made differently."""
    key = hashlib.sha256("\n".join((LLAMA_CPP_PYTHON_VERSION, *PORTABLE_CMAKE_ARGS)).encode()).hexdigest()[:12]
    return cache_dir() / f"llama.cpp-build-{LLAMA_CPP_PYTHON_VERSION}-{key}"


def build() -> Path:
    """The portable build folder (``wheel/`` with llama-cpp-python's wheel, ``build/bin/`` with the tools and
    libraries, ``build.json`` with what it was built with), compiling it first if needed (about 5 minutes on
    two cores). pip's own wheel cache is bypassed: a wheel it cached from a native build must not stand in."""
    dest = build_dir()
    if (dest / "build.json").is_file():
        return dest
    archive = sdist_archive()
    with locked(cache_dir() / f".{dest.name}.lock"):
        if (dest / "build.json").is_file():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        (dest / "wheel").mkdir(parents=True)
        print(f"compiling llama.cpp {LLAMA_CPP_PYTHON_VERSION} (portable x86-64 build, about 5 minutes on two "
              f"cores) into {dest}", file=sys.stderr, flush=True)
        env = dict(os.environ, CMAKE_ARGS=" ".join(PORTABLE_CMAKE_ARGS))
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--quiet",
               "--wheel-dir", str(dest / "wheel"), f"--config-settings=build-dir={dest / 'build'}", str(archive)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wheels = list((dest / "wheel").glob("*.whl"))
        missing = [t for t in TOOLS if not (dest / "build" / "bin" / t).is_file()]
        if done.returncode != 0 or not wheels or missing:
            raise UserError(f"Compiling llama.cpp failed (pip said: {(done.stderr or done.stdout).strip()[-600:]}). "
                            "Fix: install a C++ compiler and cmake (Debian: apt-get install build-essential cmake), "
                            "then run the step again.")
        info = {"version": LLAMA_CPP_PYTHON_VERSION, "cmake_args": list(PORTABLE_CMAKE_ARGS),
                "wheel": wheels[0].name, "libraries": _wheel_libraries(wheels[0])}
        (dest / "build.json").write_text(json.dumps(info, indent=1) + "\n")
    return dest


def _wheel_libraries(path: Path) -> dict[str, str]:
    """sha256 of every shared library the wheel installs into ``llama_cpp/lib`` (by file name)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return {Path(name).name: hashlib.sha256(archive.read(name)).hexdigest() for name in archive.namelist()
                if name.startswith("llama_cpp/lib/") and name.endswith(".so")}


def installed_is_portable_build() -> bool:
    """Whether the installed llama-cpp-python's libraries are exactly those of :func:`build`'s wheel."""
    folder = installed_lib_dir()
    info = build_dir() / "build.json"
    if folder is None or not info.is_file():
        return False
    recorded = json.loads(info.read_text())["libraries"]
    return bool(recorded) and all((folder / name).is_file()
                                  and hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
                                  for name, digest in recorded.items())


def wheel() -> Path:
    """The portable llama-cpp-python wheel (built first if needed)."""
    folder = build()
    return folder / "wheel" / json.loads((folder / "build.json").read_text())["wheel"]


def tool(name: str) -> Path:
    """One of llama.cpp's programs (:data:`TOOLS`) from the portable build (built first if needed)."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; built are {', '.join(TOOLS)}")
    return build() / "build" / "bin" / name


def installed_lib_dir() -> Path | None:
    """The folder of the installed llama-cpp-python's shared libraries, or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "lib"


def compiled_features(lib_dir: Path | None = None) -> dict[str, bool]:
    """The instruction sets the installed llama.cpp CPU backend was compiled with (ggml reports them from its
    compile-time macros, whatever the CPU it runs on): e.g. {"avx2": True, "avx512": False, "amx_int8": False}."""
    folder = lib_dir or installed_lib_dir()
    if folder is None:
        raise UserError("llama-cpp-python is not installed. Fix: `make install` (or `python -m unsloth_nb.install "
                        "llama-cpp`), which installs the portable build.")
    lib = ctypes.CDLL(str(folder / "libggml-cpu.so"))
    return {name: bool(getattr(lib, f"ggml_cpu_has_{name}")()) for name in ("avx2", "avx512", "amx_int8")}


def require_safe_build() -> None:
    """Refuse (UserError) to load models with a llama.cpp compiled with AMX code: on CPUs with AMX it crashes on
    the first decode. Such a build comes from pip compiling llama-cpp-python for an AMX machine by default."""
    if compiled_features().get("amx_int8"):
        raise UserError("The installed llama-cpp-python was compiled for this CPU's AMX units (pip's default "
                        "native build), and that build crashes with a segmentation fault on the first decode. "
                        "Fix: `python -m unsloth_nb.install llama-cpp` installs the portable build, then restart "
                        "the kernel.")
