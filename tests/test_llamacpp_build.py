"""The installed llama.cpp is the portable build: no code for AMX, whose weight repacking crashes on AMX CPUs.

Checked from what the installed libraries were compiled with, so a native build fails here on any CI machine
(on one without AMX a native build does not crash, but it would on the next machine with AMX)."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest

from unsloth_nb.errors import UserError
from unsloth_nb.gguf import llamacpp


def test_installed_libraries_are_the_portable_build() -> None:
    assert llamacpp.installed_is_portable_build(), (
        "the installed llama-cpp-python is not the portable build: run `python -m unsloth_nb.install llama-cpp`")
    info = json.loads((llamacpp.build_dir() / "build.json").read_text())
    assert info["cmake_args"] == list(llamacpp.PORTABLE_CMAKE_ARGS)
    assert "-DGGML_NATIVE=OFF" in info["cmake_args"]
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(info["cmake_args"])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
def test_installed_cpu_backend_has_no_amx_and_no_native_extensions() -> None:
    """Compile-time features, whatever this CPU has: AVX2 in, AVX-512 and AMX out (a native build on an
    AVX-512 machine has AVX-512; on an AMX machine it also has AMX)."""
    assert llamacpp.compiled_features() == {"avx2": True, "avx512": False, "amx_int8": False}


def test_reference_tools_come_from_the_same_build() -> None:
    for name in llamacpp.TOOLS:
        path = llamacpp.tool(name)
        assert path.is_relative_to(llamacpp.build_dir())
        done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
        assert "usage" in (done.stdout + done.stderr).lower(), name


def test_a_build_with_amx_is_refused_before_loading(monkeypatch, tmp_path: Path) -> None:
    from unsloth_nb import serve

    monkeypatch.setattr(llamacpp, "compiled_features", lambda lib_dir=None: {"avx2": True, "avx512": True,
                                                                              "amx_int8": True})
    with pytest.raises(UserError, match="unsloth_nb.install llama-cpp"):
        llamacpp.require_safe_build()
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(UserError, match="AMX"):
        serve.serve(model, engine="llama.cpp", show_log=False)
    assert not serve.running_servers()
