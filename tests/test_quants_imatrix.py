"""Quantizers with an importance matrix, and IQ4_NL/IQ4_XS: byte parity with llama.cpp's own quantizer.

The oracle is ``ggml_quantize_chunk`` from the libggml-base.so that llama-cpp-python ships: what
``llama-quantize`` calls for every tensor, with the imatrix row as ``quant_weights`` (or NULL without one).
It initialises the IQ tables it needs itself (``ggml_quantize_init``; IQ4 needs none).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from unsloth_nb.errors import UserError
from unsloth_nb.gguf import quants

TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.IQ4_XS]


@pytest.fixture(scope="module")
def ggml() -> ctypes.CDLL:
    try:
        import llama_cpp
    except ImportError as exc:
        pytest.fail(f"llama-cpp-python is needed as the oracle (its libggml-base.so): {exc}")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


def reference(lib: ctypes.CDLL, x: np.ndarray, qtype: T, weights: np.ndarray | None) -> np.ndarray:
    """llama.cpp's bytes for x (rows, row_len) with one imatrix row for all rows, shaped (rows, row_bytes)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros(x.size // block * size, dtype=np.uint8)
    w = None if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                      None if w is None else w.ctypes.data)
    assert written == out.size
    return out.reshape(x.shape[0], -1)


def weight_like(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """bf16-rounded rows as checkpoints hold them: normal, heavy-tailed, with outliers, Laplace, tiny in
    magnitude, and a few all-zero rows and dead (zero) columns."""
    x = np.empty((rows, cols), np.float32)
    for r in range(rows):
        scale = rng.uniform(0.002, 0.1)
        kind = r % 5
        if kind == 0:
            x[r] = rng.standard_normal(cols) * scale
        elif kind == 1:
            x[r] = rng.standard_t(2.5, cols) * scale
        elif kind == 2:
            x[r] = rng.standard_normal(cols) * scale
            x[r, rng.integers(0, cols, 8)] *= 100
        elif kind == 3:
            x[r] = rng.laplace(size=cols) * scale
        else:
            x[r] = rng.standard_normal(cols) * 10 ** rng.uniform(-12, -4)
    x[rng.integers(0, rows, 3)] = 0
    x[:, rng.integers(0, cols, 3)] = 0
    return torch.from_numpy(x).bfloat16().float().numpy()


def imatrix_like(rng: np.random.Generator, cols: int) -> np.ndarray:
    """Mean squared activations per input column: positive, spread over nine orders of magnitude, a few zeros."""
    w = (10 ** rng.uniform(-6, 3, cols) * rng.exponential(1.0, cols)).astype(np.float32)
    w[rng.integers(0, cols, 6)] = 0
    return w


def _identical(ours: np.ndarray, theirs: np.ndarray, qtype: T) -> np.ndarray:
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    return (ours.reshape(-1, block_bytes) == theirs.reshape(-1, block_bytes)).all(axis=1)


@pytest.mark.parametrize("weighted", [True, False], ids=["imatrix", "plain"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_matches_llama_cpp(ggml: ctypes.CDLL, qtype: T, weighted: bool) -> None:
    """Every block is llama-quantize's, for the widths of real models (576 sends most tensors of SmolLM2-135M to
    the 32-value types)."""
    rng = np.random.default_rng(int(qtype) * 2 + weighted)
    widths = (512, 1024) if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else (576, 1024)
    for cols in widths:
        x = weight_like(rng, 64, cols)
        w = imatrix_like(rng, cols) if weighted else None
        same = _identical(quants.quantize(x, qtype, "cpu", weights=w), reference(ggml, x, qtype, w), qtype)
        print(f"\n{qtype.name} {'imatrix' if weighted else 'plain'} {cols} columns: "
              f"{100 * same.mean():.3f}% of {same.size} blocks identical to llama.cpp")
        assert same.all()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.IQ4_NL, T.Q5_0, T.Q4_1])
def test_chunks_cut_rows_anywhere(ggml: ctypes.CDLL, qtype: T, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks smaller than a row (or not dividing it) still pair every block with its own imatrix values."""
    monkeypatch.setitem(quants._CHUNK_BLOCKS, "cpu", 3)
    rng = np.random.default_rng(5)
    x = weight_like(rng, 6, 1280)
    w = imatrix_like(rng, 1280)
    assert _identical(quants.quantize(x, qtype, "cpu", weights=w), reference(ggml, x, qtype, w), qtype).all()


def test_expert_tensors_take_one_imatrix_row_per_expert(ggml: ctypes.CDLL) -> None:
    rng = np.random.default_rng(6)
    x = weight_like(rng, 3 * 8, 512).reshape(3, 8, 512)
    w = np.stack([imatrix_like(rng, 512) for _ in range(3)])
    for qtype in (T.Q4_K, T.Q5_1):
        ours = quants.quantize(x, qtype, "cpu", weights=w)
        assert ours.shape[:2] == (3, 8)
        for e in range(3):
            assert _identical(ours[e], reference(ggml, x[e], qtype, w[e]), qtype).all()
        shared = quants.quantize(x, qtype, "cpu", weights=w[1])  # one row for every expert
        assert _identical(shared[2], reference(ggml, x[2], qtype, w[1]), qtype).all()


def test_weights_change_the_bytes() -> None:
    """The imatrix reaches the search: other bytes than without one (even all-ones weights for the K-quants,
    whose imatrix search differs from the reference one), and nothing for the types llama.cpp ignores it for."""
    rng = np.random.default_rng(7)
    x = weight_like(rng, 16, 512)
    w = imatrix_like(rng, 512)
    for qtype in quants.IMATRIX_TYPES:
        plain = quants.quantize(x, qtype, "cpu")
        weighted = quants.quantize(x, qtype, "cpu", weights=torch.from_numpy(w))
        changed = ~_identical(weighted, plain, qtype)
        assert changed.mean() > 0.1, qtype.name
    for qtype in quants.K_QUANTS:
        assert not np.array_equal(quants.quantize(x, qtype, "cpu", weights=np.ones(512, np.float32)),
                                  quants.quantize(x, qtype, "cpu")), qtype.name
    for qtype in (T.Q8_0, T.F16, T.BF16, T.F32):
        assert np.array_equal(quants.quantize(x, qtype, "cpu", weights=w), quants.quantize(x, qtype, "cpu"))


def test_the_imatrix_lowers_the_weighted_error() -> None:
    """What an imatrix is for: columns it marks as important come back more accurately."""
    rng = np.random.default_rng(8)
    x = weight_like(rng, 40, 1024)[[r for r in range(40) if r % 5 != 4]]  # model-sized values only
    w = imatrix_like(rng, 1024)
    for qtype in (T.Q4_K, T.Q6_K, T.IQ4_XS, T.Q5_0, T.Q4_1):
        errors = []
        for weights in (None, w):
            back = gguf.quants.dequantize(quants.quantize(x, qtype, "cpu", weights=weights), qtype)
            errors.append(float((w * (back - x).astype(np.float64) ** 2).sum()))
        assert errors[1] < errors[0], qtype.name


@pytest.mark.parametrize("bad, match", [
    (np.ones(511, np.float32), "one value per input column"),
    (np.ones((2, 512), np.float32), "one value per input column"),
    (np.full(512, -1e-3, np.float32), "negative, NaN or infinite"),
    (np.where(np.arange(512) == 9, np.nan, 1.0).astype(np.float32), "negative, NaN or infinite"),
    (np.where(np.arange(512) == 9, np.inf, 1.0), "negative, NaN or infinite"),
], ids=["length", "rows", "negative", "nan", "inf"])
def test_bad_weights_are_a_user_error(bad: np.ndarray, match: str) -> None:
    x = np.zeros((4, 512), np.float32)
    for qtype in (T.Q4_K, T.Q5_0, T.IQ4_NL, T.Q8_0):
        with pytest.raises(UserError, match=match):
            quants.quantize(x, qtype, "cpu", weights=bad)


def test_iq4_layout_follows_gguf_py() -> None:
    x = np.random.default_rng(9).standard_normal((2, 3, 512)).astype(np.float32)
    for qtype in quants.IQ4_QUANTS:
        got = quants.quantize(x, qtype, "cpu")
        assert got.shape == gguf.quants.quant_shape_to_byte_shape(x.shape, qtype)
        back = gguf.quants.dequantize(got, qtype)
        assert back.shape == x.shape
        assert np.sqrt(np.mean((back - x) ** 2)) < 0.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_llama_cpp(ggml: ctypes.CDLL) -> None:
    rng = np.random.default_rng(10)
    x = weight_like(rng, 64, 1024)
    w = imatrix_like(rng, 1024)
    for qtype in TYPES:
        for weights in (None, w):
            same = _identical(quants.quantize(x, qtype, "cuda", weights=weights),
                              reference(ggml, x, qtype, weights), qtype)
            print(f"\ncuda {qtype.name} {'imatrix' if weights is not None else 'plain'}: "
                  f"{100 * same.mean():.3f}% of {same.size} blocks identical to llama.cpp")
            assert same.all()
