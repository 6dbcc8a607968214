"""Quantizers: byte parity with llama.cpp's compiled reference functions, called through ctypes.

The oracle is ``quantize_row_<type>_ref`` from the libggml-base.so that llama-cpp-python ships,
the same code ``llama-quantize`` runs without an importance matrix.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from unsloth_nb.errors import UserError
from unsloth_nb.gguf import quants

_C_NAMES = {T.Q2_K: "q2_K", T.Q3_K: "q3_K", T.Q4_K: "q4_K", T.Q5_K: "q5_K", T.Q6_K: "q6_K",
            T.Q4_0: "q4_0", T.Q4_1: "q4_1", T.Q5_0: "q5_0", T.Q5_1: "q5_1", T.Q8_0: "q8_0"}
TYPES = list(_C_NAMES)


@pytest.fixture(scope="module")
def ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    for name in _C_NAMES.values():
        fn = getattr(lib, f"quantize_row_{name}_ref")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    return lib


def reference(lib: ctypes.CDLL, x: np.ndarray, qtype: T) -> np.ndarray:
    """llama.cpp's bytes for x (rows, row_len), shaped (rows, row_bytes)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.empty(x.size // block * size, dtype=np.uint8)
    getattr(lib, f"quantize_row_{_C_NAMES[qtype]}_ref")(x.ctypes.data, out.ctypes.data, x.size)
    return out.reshape(x.shape[0], -1)


def hard_cases(rng: np.random.Generator) -> np.ndarray:
    """Rows of 1024 values (4 super-blocks): weights as models have them plus the corner cases."""
    rows = []
    for _ in range(24):
        scale = np.float32(rng.uniform(0.005, 0.1))
        rows.append(rng.standard_normal(1024).astype(np.float32) * scale)
    x = np.stack(rows)
    x = torch.from_numpy(x).bfloat16().float().numpy()  # bf16-rounded, as real checkpoints are
    special = np.zeros((16, 1024), np.float32)
    special[0, 7] = 3.0  # a single outlier in a zero block
    special[1] = rng.standard_normal(1024) * 0.02
    special[1, rng.integers(0, 1024, 12)] *= 80  # outliers
    special[2, :256] = 0.5  # constant blocks, positive, negative, mixed with zeros
    special[2, 256:512] = -0.25
    special[2, 512:528] = 1.0
    special[3] = rng.standard_normal(1024) * 1e-30  # tiny
    special[4] = rng.standard_normal(1024) * 1e30  # huge
    special[5] = rng.standard_normal(1024) * 1e-42  # subnormal
    special[6] = np.abs(rng.standard_normal(1024)) * 0.03  # all positive
    special[7] = -np.abs(rng.standard_normal(1024)) * 0.03  # all negative
    special[8] = rng.integers(-3, 4, 1024).astype(np.float32) * 0.01  # few distinct values (ties)
    special[9] = rng.standard_normal(1024) * 60000  # near the fp16 limit
    special[10, ::2] = 1e-3
    special[11] = np.linspace(-1, 1, 1024, dtype=np.float32)
    special[12] = rng.standard_normal(1024) * 1e-18
    special[13] = rng.standard_normal(1024) * 1e18
    special[14, 100] = -1e-25
    special[15] = rng.standard_normal(1024) * 0.02
    special[15, :256:3] = 0
    return np.concatenate([x, special])


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_matches_llama_cpp(ggml: ctypes.CDLL, qtype: T) -> None:
    x = hard_cases(np.random.default_rng(int(qtype)))
    theirs = reference(ggml, x, qtype)
    t0 = time.perf_counter()
    ours = quants.quantize(x, qtype, "cpu")
    elapsed = time.perf_counter() - t0
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    same = (ours.reshape(-1, block_bytes) == theirs.reshape(-1, block_bytes)).all(axis=1)
    print(f"\n{qtype.name}: {100 * same.mean():.3f}% of {same.size} blocks identical to llama.cpp ({elapsed:.2f} s)")
    assert same.mean() >= 0.999
    normal = x[:24]  # round trip on model-like rows: our error is llama.cpp's error
    ours_err = _rmse(gguf.quants.dequantize(ours[:24], qtype), normal)
    theirs_err = _rmse(gguf.quants.dequantize(theirs[:24], qtype), normal)
    assert ours_err <= theirs_err * 1.001
    assert ours_err < 0.5 * float(np.sqrt(np.mean(normal.astype(np.float64) ** 2)))


@pytest.mark.parametrize("qtype", quants.K_QUANTS, ids=lambda q: q.name)
def test_many_random_blocks(ggml: ctypes.CDLL, qtype: T) -> None:
    """A larger draw of bf16 weights with outliers, several chunks long."""
    rng = np.random.default_rng(100 + int(qtype))
    x = rng.standard_normal((160, 2048)).astype(np.float32) * rng.uniform(0.002, 0.05, (160, 1)).astype(np.float32)
    x[rng.random(x.shape) < 1e-3] *= 30
    x = torch.from_numpy(x).bfloat16().float().numpy()
    ours = quants.quantize(torch.from_numpy(x).bfloat16(), qtype, "cpu")  # a bf16 tensor goes in as is
    theirs = reference(ggml, x, qtype)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    same = (ours.reshape(-1, block_bytes) == theirs.reshape(-1, block_bytes)).all(axis=1)
    print(f"\n{qtype.name}: {100 * same.mean():.3f}% of {same.size} random blocks identical")
    assert same.mean() >= 0.999


def test_layout_and_shapes_follow_gguf_py() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 512)).astype(np.float32)
    for qtype in (T.Q8_0, T.Q4_0, T.Q5_1, T.F16, T.BF16, T.F32):
        expected = gguf.quants.quantize(x, qtype)
        got = quants.quantize(x, qtype)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert np.array_equal(got, expected)
    for qtype in quants.K_QUANTS:
        got = quants.quantize(x, qtype, "cpu")
        assert got.shape == (2, 3, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
        assert got.shape == gguf.quants.quant_shape_to_byte_shape(x.shape, qtype)
        back = gguf.quants.dequantize(got, qtype)
        assert back.shape == x.shape and np.isfinite(back).all()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0, T.F16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_is_a_user_error(qtype: T, bad: float) -> None:
    x = np.zeros((4, 256), np.float32)
    x[2, 17] = bad
    with pytest.raises(UserError, match="NaN or infinite"):
        quants.quantize(x, qtype, "cpu")


def test_row_length_must_fit_the_block() -> None:
    with pytest.raises(UserError, match="blocks hold 256"):
        quants.quantize(np.zeros((2, 288), np.float32), T.Q4_K, "cpu")
    with pytest.raises(UserError, match="not supported"):
        quants.quantize(np.zeros((2, 256), np.float32), T.IQ2_XS, "cpu")


def test_speed_against_c(ggml: ctypes.CDLL) -> None:
    """Print-only: throughput of our CPU Q4_K/Q6_K against the C reference (one thread) on one tensor."""
    x = torch.randn(256, 8192).mul_(0.02).bfloat16().float().numpy()
    for qtype in (T.Q4_K, T.Q6_K):
        t0 = time.perf_counter()
        reference(ggml, x, qtype)
        c_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        quants.quantize(x, qtype, "cpu")
        ours = time.perf_counter() - t0
        print(f"\n{qtype.name} 256x8192: C reference {c_time:.2f} s, unsloth_nb cpu {ours:.2f} s "
              f"(torch threads {torch.get_num_threads()})")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(ggml: ctypes.CDLL) -> None:
    x = hard_cases(np.random.default_rng(7))
    for qtype in quants.K_QUANTS:
        on_gpu = quants.quantize(x, qtype, "cuda")
        theirs = reference(ggml, x, qtype)
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        same = (on_gpu.reshape(-1, block_bytes) == theirs.reshape(-1, block_bytes)).all(axis=1)
        print(f"\ncuda {qtype.name}: {100 * same.mean():.3f}% of {same.size} blocks identical to llama.cpp")
        assert same.mean() >= 0.999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fused_kernels_match_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused Triton searches give the eager torch code's bytes (which match llama.cpp's)."""
    x = torch.from_numpy(hard_cases(np.random.default_rng(11)))
    for qtype in quants.K_QUANTS:
        monkeypatch.setenv("UNSLOTH_NB_FUSED", "0")
        eager = quants.quantize(x, qtype, "cuda")
        monkeypatch.setenv("UNSLOTH_NB_FUSED", "1")
        assert np.array_equal(quants.quantize(x, qtype, "cuda"), eager), qtype.name
    assert not quants._FUSED_BROKEN


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_prepare_builds_the_fused_kernels_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    """convert.prepare returns at once with a thread that runs every fused kernel (so Triton builds them)."""
    from unsloth_nb.gguf import convert, quants_triton

    ran = []
    for name in ("make_qkx2", "make_qx"):
        kernel = getattr(quants_triton, name)
        monkeypatch.setattr(quants_triton, name, lambda *a, _k=kernel, _n=name: ran.append(_n) or _k(*a))
    thread = convert.prepare(["q4_k_m", "q8_0"], "cuda")
    thread.join()
    assert sorted(set(ran)) == ["make_qkx2", "make_qx"] and not quants._FUSED_BROKEN


def test_prepare_builds_nothing_without_a_gpu_or_a_k_quant() -> None:
    from unsloth_nb.gguf import convert

    assert convert.prepare(["q4_k_m"], "cpu") is None
    assert convert.prepare(["q8_0", "bf16"], "cuda") is None
    with pytest.raises(UserError, match="q4_k_m"):
        convert.prepare(["q4_km"], "cpu")


INTERPRETED_FUSED_CHECK = """
import numpy as np, torch
from unsloth_nb.gguf import quants, quants_triton

g = torch.Generator().manual_seed(0)
x = torch.randn(8, 2048, generator=g) * 0.02
x[:, ::97] *= 40  # outliers
x[0, :512] = 0  # all-zero blocks
x[1, :512] = 0.5  # constant blocks
x[2, :256] = torch.linspace(-1e-3, 1e-3, 256)
x = x.bfloat16().float()
eager = {q: quants.quantize(x, q, "cpu") for q in quants.K_QUANTS}
ran = []
for name in ("make_qkx2", "make_qx"):
    kernel = getattr(quants_triton, name)
    setattr(quants_triton, name, lambda *a, _k=kernel, _n=name: ran.append(_n) or _k(*a))
quants._use_fused = lambda t, exact: not exact
for q in quants.K_QUANTS:
    out = quants.quantize(x, q, "cpu")
    size = out.size // (x.numel() // 256)
    same = (out.reshape(-1, size) == eager[q].reshape(-1, size)).all(axis=1)
    print(f"{q.name}: fused kernels in Triton's interpreter vs eager: {100 * same.mean():.3f}% of blocks identical")
    assert same.all(), q.name
assert not quants._FUSED_BROKEN, quants._FUSED_BROKEN
assert sorted(set(ran)) == ["make_qkx2", "make_qx"] and len(ran) == 4, ran
ran.clear()
quants.warm_up([q for q in quants.K_QUANTS for _ in range(2)], "cpu")  # each type once: what convert.prepare runs
assert sorted(ran) == ["make_qkx2", "make_qkx2", "make_qkx2", "make_qx"], ran
"""


def test_fused_kernels_match_eager_in_triton_interpreter() -> None:
    """The fused Triton searches give the eager code's bytes, checked without a GPU: Triton's interpreter runs
    the kernels on the CPU (it must be switched on before the kernels are defined, hence a fresh process)."""
    done = subprocess.run([sys.executable, "-c", INTERPRETED_FUSED_CHECK], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=1200)
    print("\n" + done.stdout)
    assert done.returncode == 0, done.stderr[-3000:]


def test_fused_kernel_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A GPU or Triton install that cannot build the fused kernels gets one warning and the eager path."""
    monkeypatch.setattr(quants, "_FUSED_BROKEN", [])
    with caplog.at_level(logging.WARNING, logger="unsloth_nb.gguf.quants"):
        assert quants._run_fused("no_such_kernel") is None
    assert "eager torch" in caplog.text and quants._FUSED_BROKEN
    assert not quants._fused()
