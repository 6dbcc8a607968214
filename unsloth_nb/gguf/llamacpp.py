"""llama.cpp as an optional backend and as our reference.

The PyPI package ``llama-cpp-python`` ships only an sdist, and that sdist vendors the whole llama.cpp
tree: the reference converter ``convert_hf_to_gguf.py``, a ``gguf-py`` newer than PyPI's, the
quantizer sources and real vocabularies under ``models/``. We fetch that one archive from PyPI
(``pip download``), cache it, and unpack what we need. Nothing here compiles anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from unsloth_nb.errors import UserError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The llama-cpp-python release whose vendored llama.cpp we use as reference (pinned in requirements-cpu.txt)."""

_SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
_VENDOR_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
# Parts of the vendored tree we unpack: the converter and its package, gguf-py, vocabularies and
# chat templates. The C sources stay in the archive unless someone builds the tools.
_WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/", "LICENSE")


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
    if (dest / ".complete").is_file():
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
        (tmp / ".complete").write_text(LLAMA_CPP_PYTHON_VERSION)
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
