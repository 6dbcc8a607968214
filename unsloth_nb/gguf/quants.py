"""Tensor quantizers that write the same bytes as llama.cpp's quantizer, with or without an importance matrix.

gguf-py can quantize the float types, Q8_0 and the legacy 32-element types, but not the K-quants nor IQ4.
Here Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS are vectorised torch code (same code on CPU and
CUDA) that follows ``ggml-quants.c`` step by step: every reduction C does as a sequential float32 loop is
a sequential loop over the few elements of a sub-block here, vectorised across all sub-blocks, so
rounding happens in the same order and the bytes match. With an importance matrix (``weights``: per input
column, the mean squared activation) the K-quants and the legacy Q4_0/Q4_1/Q5_0/Q5_1 follow llama.cpp's
``*_impl`` searches instead of the reference ones (IQ4 has one search, weighted by x^2 without a matrix).
A tensor is processed in chunks so memory stays bounded. On the CPU the cost is mostly torch calls: each
scale search reuses its buffers, works in place, and does a sequential sum as one ``index_add_`` call
instead of one call per element.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

from unsloth_nb.errors import UserError

logger = logging.getLogger(__name__)

QK_K = 256
_GROUP_MAX_EPS = 1e-15
_CHUNK_BLOCKS = {"cpu": 1024, "cuda": 65536}
"""Super-blocks of 256 values quantized at once (bounds the temporary memory)."""
_ROW_CHUNK_ELEMS = 1 << 20
"""Values handed to gguf-py at once for the types it quantizes."""

K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
"""The K-quants, quantized by the torch code in this module."""
IQ4_QUANTS = (T.IQ4_NL, T.IQ4_XS)
"""The 4-bit non-linear types, quantized by the torch code in this module."""
TORCH_TYPES = K_QUANTS + IQ4_QUANTS
"""Types always quantized by the torch code in this module."""
LEGACY_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
"""32-element types: gguf-py without an importance matrix, the torch code here with one."""
GGUF_PY_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, *LEGACY_TYPES)
"""Types left to gguf-py (without an importance matrix), whose numpy code is byte-exact with llama.cpp for them."""
IMATRIX_TYPES = TORCH_TYPES + LEGACY_TYPES
"""Types whose bytes an importance matrix changes (llama.cpp ignores it for Q8_0 and the float types)."""
_IQ4_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""kvalues_iq4nl: the 16 levels of IQ4_NL and IQ4_XS, in units of the block scale."""
_IQ4_TRIALS = 7
"""Scale trials each side of the first guess (the ntry that llama-quantize's quantize_iq4_nl/_xs pass)."""


def _f32(v: float) -> np.float32:
    """A C float constant (so scalar maths rounds to float32 exactly as C does)."""
    return np.float32(v)


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: add 1.5*2^23 in float32 and read the low mantissa bits (round half to even)."""
    bits = (v + 12582912.0).view(torch.int32)
    # x86 turns NaN into the default NaN (mantissa 0x400000), so C gets 0; CUDA's canonical NaN
    # has every mantissa bit set, so NaN is mapped explicitly.
    return torch.where(torch.isnan(v), 0, (bits & 0x007FFFFF) - 0x00400000)


def _fp16_round(v: torch.Tensor) -> torch.Tensor:
    """Round float32 to fp16 and back (what storing d in a block and reading it again does)."""
    return v.to(torch.float16).to(torch.float32)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 bytes of v, shape (..., 2). A NaN scale (from values so large that their squares
    overflow) is stored as C stores x86's default NaN, 0xFE00; CUDA's own NaN would give other bits."""
    bits = v.to(torch.float16).view(torch.int16)
    if v.is_cuda:
        bits = torch.where(torch.isnan(v), -512, bits)
    return bits.view(torch.uint8).reshape(*v.shape, 2)


def _cdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """num / t as one IEEE float32 division (``num / t`` in torch multiplies by a reciprocal)."""
    return torch.full_like(t, num) / t


def _divc(t: torch.Tensor, den: float) -> torch.Tensor:
    """t / den as one IEEE float32 division per element."""
    return t / torch.full_like(t, den)


def _sqrtf(t: torch.Tensor) -> torch.Tensor:
    """C's sqrtf: sqrt in float64 then rounded is the correctly rounded float32 sqrt (torch's float32 sqrt may
    be off by one ulp on CPU)."""
    return torch.sqrt(t.double()).float()


def _seq_sum(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Sum over ``dim`` one element at a time in float32, like C's ``float s = 0; for (...) s += t[i];``.

    Other dims are independent sums done together. On the CPU, index_add_ runs exactly that loop
    (slice after slice, in order) inside one call, without a Python step per slice. It does so over a middle
    dim, hence the (1, n, ..., 1) view: over a first or last dim it turns into a threaded scatter_add_ (same
    order), which took 100 ms instead of 0.03 for a (32, 8192) sum whenever other processes kept the cores
    busy. CUDA's index_add_ adds atomically in any order, so there each slice is one call."""
    if t.device.type == "cpu":
        src = t.movedim(dim, 0)[None, ..., None]
        out = torch.zeros((1, 1, *src.shape[2:]), dtype=t.dtype)
        return out.index_add_(1, torch.zeros(t.shape[dim], dtype=torch.long), src)[0, 0, ..., 0]
    rows = t.unbind(dim)
    s = rows[0] + 0.0
    for r in rows[1:]:
        s.add_(r)
    return s


_FUSED_BROKEN: list[str] = []
"""Why the fused kernels failed in this process, once they have (then the eager path is used)."""


def _fused() -> bool:
    """Whether CUDA searches run as the fused Triton kernels of ``quants_triton`` (Triton installed, they have
    not failed here, and UNSLOTH_NB_FUSED is not 0; the eager torch path is the reference they match)."""
    if _FUSED_BROKEN or os.environ.get("UNSLOTH_NB_FUSED", "1") == "0":
        return False
    return importlib.util.find_spec("triton") is not None


def _use_fused(x: torch.Tensor, exact: bool) -> bool:
    """Whether a search over x runs as a fused kernel: on CUDA, for the common case (not ``exact``)."""
    return x.is_cuda and not exact and _fused()


def _run_fused(name: str, *args: object) -> tuple[torch.Tensor, ...] | None:
    """quants_triton.<name>(*args), or None (and eager from then on) if Triton cannot build or run it here."""
    try:
        from unsloth_nb.gguf import quants_triton

        return getattr(quants_triton, name)(*args)
    except Exception as exc:  # an old GPU or a broken Triton install: the eager path gives the same bytes
        _FUSED_BROKEN.append(f"{type(exc).__name__}: {exc}")
        logger.warning("The fused Triton K-quant kernels failed on this GPU (%s); using the slower eager torch "
                       "code instead, which writes the same bytes.", _FUSED_BROKEN[0][:200])
        return None


def _first_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along dim 0, sign kept, first on ties, NaN skipped, 0 if none (C's scan)."""
    ax = x.abs().nan_to_num_(nan=-1.0, posinf=torch.inf)
    idx = ax.argmax(dim=0, keepdim=True)
    return torch.where(ax.gather(0, idx)[0] > 0, x.gather(0, idx)[0], 0.0)


def _max_positive(t: torch.Tensor) -> torch.Tensor:
    """Row maximum of t (B, n) seeded with +0 and skipping NaN, like C's ``m = 0; if (v > m) m = v;``."""
    return torch.where(t > 0, t, 0.0).amax(dim=1)


def _round_clamp(v: torch.Tensor, lo: int, hi: int, exact: bool) -> torch.Tensor:
    """clamp(nearest_int(v), lo, hi) as float32, in place. torch's round (half to even) equals
    nearest_int for |v| <= 2^22; ``exact`` also reproduces C's result for NaN, inf and huge v."""
    if exact:
        return v.copy_(_nearest_int(v).clamp_(lo, hi))
    return v.round_().clamp_(lo, hi)


class _Scratch:
    """Buffers one scale search reuses on every trial, so a trial allocates nothing of size (n, M).

    ``lf`` holds a trial's L as float, ``prod`` (k, n, M) the k per-element terms C accumulates, summed
    together over dim 1, and ``terms`` its k contiguous (n, M) parts, which the products are written to."""

    def __init__(self, x: torch.Tensor, k: int) -> None:
        self.lf = torch.empty_like(x)
        self.prod = torch.empty((k, *x.shape), dtype=x.dtype, device=x.device)
        self.terms = self.prod.unbind(0)


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool, exact: bool, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants on columns of x (n, M): returns scale (M,), -min (M,) and L (n, M) float.
    make_qkx3_quants, which the importance-matrix searches call (with ``fused`` False: they stay eager), is the
    same maths with other grid parameters.

    Searches a grid of inverse scales and keeps the weighted least-squares (scale, min) with the
    lowest weighted error; the best min so far feeds the next trial as in C. L is recomputed once
    at the end from the winning (iscale, min) instead of being copied at every improvement.
    """
    factors = torch.tensor([_f32(rmin) + _f32(rdelta) * _f32(step) + _f32(nmax) for step in range(nstep + 1)],
                           dtype=torch.float32, device=x.device)
    if fused and _use_fused(x, exact):
        result = _run_fused("make_qkx2", x, w, nmax, factors, use_mad)
        if result is not None:
            return result
    mn = x.amin(dim=0)
    mx = x.amax(dim=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    # C keeps the first element equal to the minimum: where that is a zero, its sign is what Q4_1/Q5_1 store.
    first_zero = x.gather(0, (x == 0).to(torch.uint8).argmax(dim=0, keepdim=True))[0]
    mn = torch.where(mn > 0, 0.0, torch.where(mn == 0, first_zero, mn))
    flat = mx == mn
    span = torch.where(flat, 1.0, mx - mn)
    iscale = _cdiv(float(nmax), span)
    scale = _cdiv(1.0, iscale)
    scratch = _Scratch(x, 3)
    lf = _round_clamp(torch.sub(x, mn, out=scratch.lf).mul_(iscale), 0, nmax, exact)
    best_error = _qkx2_error(x, w, scratch, scale, mn, use_mad)
    best_iscale, best_mn = torch.where(flat, 0.0, iscale), mn
    for factor in factors:
        best_error, best_iscale, best_mn, scale, mn = _qkx2_trial(x, w, mx, flat, sum_w, sum_x, factor, best_error,
                                                                  best_iscale, best_mn, scale, mn, nmax, use_mad,
                                                                  exact, scratch)
    L = _round_clamp(torch.sub(x, best_mn, out=lf).mul_(best_iscale), 0, nmax, exact)
    return torch.where(flat, 0.0, scale), -mn, L


def _qkx2_error(x: torch.Tensor, w: torch.Tensor, scratch: _Scratch, scale: torch.Tensor, mn: torch.Tensor,
                use_mad: bool) -> torch.Tensor:
    """sum(w * |scale*L + min - x|^p) per column for L in scratch.lf (p = 1 with use_mad, else 2),
    accumulated in C's order. Overwrites scratch.lf."""
    diff = scratch.lf.mul_(scale).add_(mn).sub_(x)
    err = diff.abs_() if use_mad else diff.mul_(diff)
    return _seq_sum(err.mul_(w))


def _qkx2_trial(x: torch.Tensor, w: torch.Tensor, mx: torch.Tensor, flat: torch.Tensor, sum_w: torch.Tensor,
                sum_x: torch.Tensor, factor: torch.Tensor, best_error: torch.Tensor, best_iscale: torch.Tensor,
                best_mn: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, nmax: int, use_mad: bool,
                exact: bool, scratch: _Scratch) -> tuple[torch.Tensor, ...]:
    """One trial inverse scale of make_qkx2_quants: fit (scale, min) for it and keep it where it is better.

    Returns the updated (best_error, best_iscale, best_mn, scale, mn)."""
    iscale = factor / torch.where(flat, 1.0, mx - mn)
    lf = _round_clamp(torch.sub(x, mn, out=scratch.lf).mul_(iscale), 0, nmax, exact)
    wl, wlx, wl2 = scratch.terms
    torch.mul(w, lf, out=wl)
    torch.mul(wl, x, out=wlx)
    torch.mul(wl, lf, out=wl2)
    sum_l, sum_xl, sum_l2 = _seq_sum(scratch.prod, dim=1)
    det = sum_w * sum_l2 - sum_l * sum_l
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
    positive = this_min > 0
    this_min = torch.where(positive, 0.0, this_min)
    this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
    cur_error = _qkx2_error(x, w, scratch, this_scale, this_min, use_mad)
    better = (det > 0) & (cur_error < best_error) & ~flat
    return (torch.where(better, cur_error, best_error), torch.where(better, iscale, best_iscale),
            torch.where(better, mn, best_mn), torch.where(better, this_scale, scale),
            torch.where(better, this_min, mn))


def _make_qx(x: torch.Tensor, nmax: int, exact: bool,
             w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants with rmse_type 1 on columns of x (n, M): scale (M,), L (n, M).

    The weights are w (n, M) where given (the importance-matrix searches, always eager), else x^2."""
    factors = torch.tensor([-(_f32(nmax) + _f32(0.1) * _f32(step)) for step in range(-9, 10) if step != 0],
                           dtype=torch.float32, device=x.device)
    if w is None and _use_fused(x, exact):
        fused = _run_fused("make_qx", x, nmax, factors)
        if fused is not None:
            return fused
    mx = _first_absmax(x)
    tiny = mx.abs() < _GROUP_MAX_EPS
    safe = torch.where(tiny, 1.0, mx)
    w = x * x if w is None else w
    wx = w * x
    scratch = _Scratch(x, 2)
    best_iscale = _cdiv(float(-nmax), safe)
    sumlx, suml2 = _qx_sums(x, w, wx, best_iscale, nmax, exact, scratch)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for factor in factors:
        best_iscale, scale, best = _qx_trial(x, w, wx, safe, factor, best_iscale, scale, best, nmax, exact,
                                             scratch)
    L = _round_clamp(torch.mul(x, best_iscale, out=scratch.lf), -nmax, nmax - 1, exact).add_(nmax)
    L = torch.where(tiny, 0.0, L)
    return torch.where(tiny, 0.0, scale), L


def _qx_sums(x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, iscale: torch.Tensor, nmax: int,
             exact: bool, scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(w*x*L) and sum(w*L*L) per column for L = round(iscale * x), as make_qx_quants accumulates them."""
    lf = _round_clamp(torch.mul(x, iscale, out=scratch.lf), -nmax, nmax - 1, exact)
    wxl, wl2 = scratch.terms
    torch.mul(wx, lf, out=wxl)
    torch.mul(lf, w, out=wl2).mul_(lf)
    sums = _seq_sum(scratch.prod, dim=1)
    return sums[0], sums[1]


def _qx_trial(x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, safe: torch.Tensor, factor: torch.Tensor,
              best_iscale: torch.Tensor, scale: torch.Tensor, best: torch.Tensor, nmax: int,
              exact: bool, scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One trial inverse scale of make_qx_quants; returns the updated (best_iscale, scale, best)."""
    iscale = factor / safe
    sumlx, suml2 = _qx_sums(x, w, wx, iscale, nmax, exact, scratch)
    better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
    new_scale = torch.where(better, sumlx / suml2, scale)
    return torch.where(better, iscale, best_iscale), new_scale, torch.where(better, new_scale * sumlx, best)


def _make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants with do_rmse on columns of x (n, M): x^2-weighted fit, then up to 5 passes
    of per-element coordinate descent (run all 5: a pass that changes nothing leaves the state as is)."""
    n = x.shape[0]
    mx = _first_absmax(x)
    tiny = mx.abs() < _GROUP_MAX_EPS
    safe = torch.where(tiny, torch.ones_like(mx), mx)
    iscale = _cdiv(float(-nmax), safe)
    L = _nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = L.to(x.dtype)
    sumlx = _seq_sum(wx * lf)
    suml2 = _seq_sum(w * lf * lf)
    rows = list(L.unbind(0))
    for _ in range(5):
        for i in range(n):
            li = rows[i].to(x.dtype)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = _nearest_int(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1)
            nf = new_l.to(x.dtype)
            slx_new = slx + wx[i] * nf
            sl2_new = sl2 + w[i] * nf * nf
            accept = ((slx > 0) & (new_l != rows[i]) & (sl2_new > 0)
                      & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            rows[i] = torch.where(accept, new_l, rows[i])
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
    L = torch.stack(rows)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), torch.zeros_like(sumlx))
    L = torch.where(tiny, torch.zeros_like(L), L + nmax)
    return torch.where(tiny, torch.zeros_like(scale), scale), L


def _make_qp(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qp_quants on columns of x (n, M) (a super-block's sub-block scales or mins, >= 0) weighted
    by w (n, M): scale (M,) and L (n, M) int as C's uint8 array holds it (a negative level would wrap).

    Eight trial inverse scales around nmax/max, then up to 5 passes of per-element coordinate descent (all 5
    run: a pass that changes nothing leaves the state as is)."""
    mx = x.amax(dim=0).clamp_(min=0.0)
    zero = mx < _GROUP_MAX_EPS
    safe = torch.where(zero, 1.0, mx)
    iscale = _cdiv(float(nmax), safe)
    scale = _cdiv(1.0, iscale)
    diff = x - scale * (_nearest_int(iscale * x) & 0xFF).to(x.dtype)
    best = _seq_sum(w * diff * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = _cdiv(float(_f32(0.1) * _f32(step) + _f32(nmax)), safe)
        diff = x - _cdiv(1.0, trial) * _nearest_int(trial * x).clamp_(max=nmax).to(x.dtype)
        mse = _seq_sum(w * diff * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, trial, iscale)
    levels = _nearest_int(iscale * x).clamp_(max=nmax)
    lf = levels.to(x.dtype)
    wx = w * x
    sumlx = _seq_sum(wx * lf)
    suml2 = _seq_sum(w * lf * lf)
    rows = list((levels & 0xFF).unbind(0))
    for _ in range(5):
        for i in range(x.shape[0]):
            li = rows[i].to(x.dtype)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = _nearest_int(x[i] * sl2 / slx).clamp_(max=nmax)
            nf = new_l.to(x.dtype)
            slx_new = slx + wx[i] * nf
            sl2_new = sl2 + w[i] * nf * nf
            accept = ((slx > 0) & (sl2 > 0) & (new_l != rows[i])
                      & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            rows[i] = torch.where(accept, new_l & 0xFF, rows[i])
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, torch.stack(rows))


def _iq4_tables(device: torch.device) -> torch.Tensor:
    """(3, 242) lookup of best_index_int8's last step for v in [k, k+1), k = -128..113 (the levels are integers,
    so floor(v) fixes the two candidates): the upper candidate's index (1..15) and the levels below and at it."""
    grid = np.array(_IQ4_GRID)
    upper = np.clip(np.searchsorted(grid, np.arange(-128, 114), side="right"), 1, 15)
    return torch.tensor(np.stack([upper, grid[upper - 1], grid[upper]]), dtype=torch.float32, device=device)


def _iq4_nearest(v: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's best_index_int8 on the IQ4 grid: index (as float) and value of the nearest level, the upper one
    of two equally near (both distances in float32 as C computes them); NaN gets 15 as in C."""
    k = v.nan_to_num(nan=math.inf).floor_().clamp_(-128, 113).long().add_(128)
    upper, lo, hi = tables[:, k]
    lower = (v - lo) < (hi - v)
    return torch.where(lower, upper - 1, upper), torch.where(lower, lo, hi)


def _iq4_sums(x: torch.Tensor, w: torch.Tensor, iscale: torch.Tensor,
              tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(w*q*x) and sum(w*q*q) per column for q the grid level nearest iscale * x, accumulated as C does."""
    q = _iq4_nearest(iscale * x, tables)[1]
    wq = w * q
    sums = _seq_sum(torch.stack([wq * x, wq * q]), dim=1)
    return sums[0], sums[1]


def _iq4_scales(x: torch.Tensor, w: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The block scale search of quantize_row_iq4_nl_impl on columns of x (32, M) weighted by w: scale (M,), 0
    for a block below GROUP_MAX_EPS. A first guess from the largest value, then 2*ntry+1 trial inverse scales
    each fitted by weighted least squares; the levels are picked afterwards from the final scale."""
    mx = _first_absmax(x)
    tiny = mx.abs() < _GROUP_MAX_EPS
    safe = torch.where(tiny, 1.0, mx)
    sumqx, sumq2 = _iq4_sums(x, w, _cdiv(1.0, _divc(-safe, float(_IQ4_GRID[0]))), tables)
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, 1.0), 0.0)
    best = d * sumqx
    for step in range(-_IQ4_TRIALS, _IQ4_TRIALS + 1):
        sumqx, sumq2 = _iq4_sums(x, w, _cdiv(float(step + _IQ4_GRID[0]), safe), tables)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(tiny, 0.0, d)


def _iq4_weights(blocks: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """IQ4's per-value weights for super-blocks (B, S): x^2 without an importance matrix, else
    qw * sqrt(sigma2 + x^2) with sigma2 = sum(x^2) * 2/S."""
    x2 = blocks * blocks
    if qw is None:
        return x2
    sigma2 = _seq_sum(x2, dim=1) * float(_f32(2.0) / _f32(blocks.shape[1]))
    return _imatrix_weights(blocks, qw, sigma2)


def _imatrix_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """qw * sqrt(sigma2 + x^2) for x and qw (B, S) and sigma2 (B,): how every ``*_impl`` search of llama.cpp (but
    Q6_K's) turns the importance matrix into per-value weights."""
    return qw * _sqrtf(sigma2[:, None] + x * x)


def _row_sigma2(blocks: torch.Tensor, twice: bool) -> torch.Tensor:
    """The K-quant ``*_impl`` sigma2 of super-blocks (B, 256): sum(x^2)/256, doubled first with ``twice``."""
    s = _seq_sum(blocks * blocks, dim=1)
    return _divc(2 * s if twice else s, float(QK_K))


def _to_columns(blocks: torch.Tensor, sub: int) -> torch.Tensor:
    """(B, K) blocks -> (sub, B * K / sub): one column per sub-block, elements down dim 0."""
    return blocks.reshape(-1, sub).T.contiguous()


def _from_columns(cols: torch.Tensor, nblocks: int) -> torch.Tensor:
    """Inverse of _to_columns: (sub, M) -> (B, K)."""
    return cols.T.reshape(nblocks, -1)


def _pack_6bit_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12-byte Q4_K/Q5_K scale field from 8 scales and 8 mins per block (B, 8), each kept to its byte as C
    does (beyond 63, bits spill into the neighbours' top bits)."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return (torch.cat([lo, mid, hi], dim=1) & 0xFF).to(torch.uint8)


def _unpack_6bit_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's get_scale_min_k4 for all 8 sub-blocks of (B, 12) packed fields: the scales and mins (B, 8) that the
    final requantisation reads back."""
    q = packed.to(torch.int32)
    sc = torch.cat([q[:, :4] & 63, (q[:, 8:] & 0xF) | ((q[:, :4] >> 6) << 4)], dim=1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def _requant_affine(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dm: torch.Tensor, nmax: int) -> torch.Tensor:
    """Final pass of Q2_K/Q4_K/Q5_K: L = clamp(rint((x + dm) / d)), keeping the search's L where d == 0."""
    zero = d == 0
    q = _nearest_int((x + dm) / torch.where(zero, torch.ones_like(d), d)).clamp_(0, nmax)
    return torch.where(zero, L.to(q.dtype), q)


def _q4_q5_k(blocks: torch.Tensor, qw: torch.Tensor | None, nmax: int, rmin: float, nstep: int,
             exact: bool) -> tuple[torch.Tensor, ...]:
    """Shared part of Q4_K (nmax 15) and Q5_K (nmax 31): the 16 header bytes (d, dmin, scales) and L (B, 256).

    Without an importance matrix the reference search (rmin, nstep) and 6-bit scales against the largest;
    with one, quantize_row_q4_K_impl/q5_K_impl: a finer search and make_qp_quants for the 6-bit scales."""
    nb = blocks.shape[0]
    x = _to_columns(blocks, 32)
    if qw is None:
        w = _sqrtf(_divc(_seq_sum(x * x), 32.0)) + x.abs()
        scales, mins, L = _make_qkx2(x, w, nmax, rmin, 0.1, nstep, False, exact)
        scales = scales.reshape(nb, 8)
        mins = mins.reshape(nb, 8)
        max_scale = _max_positive(scales)
        max_min = _max_positive(mins)
        inv_scale = torch.where(max_scale > 0, _cdiv(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
        inv_min = torch.where(max_min > 0, _cdiv(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
        ls = (_nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
        lm = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
        d = _fp16_round(_divc(max_scale, 63.0))
        dmin = _fp16_round(_divc(max_min, 63.0))
    else:
        w = _to_columns(_imatrix_weights(blocks, qw, _row_sigma2(blocks, twice=True)), 32)
        sw = _seq_sum(w).reshape(nb, 8).T
        scales, mins, L = _make_qkx2(x, w, nmax, -0.9, 0.05, 36, False, exact, fused=False)
        d, ls = _make_qp(scales.reshape(nb, 8).T, sw, 63)
        dmin, lm = _make_qp(mins.reshape(nb, 8).T, sw, 63)
        ls, lm = ls.T, lm.T
        if nmax == 31:  # Q5_K's impl caps the levels at 63, Q4_K's does not
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        d, dmin = _fp16_round(d), _fp16_round(dmin)
    packed = _pack_6bit_scales(ls, lm)
    sc, m = _unpack_6bit_scales(packed)
    dj = (d[:, None] * sc.to(torch.float32)).reshape(1, -1)
    dmj = (dmin[:, None] * m.to(torch.float32)).reshape(1, -1)
    L = _requant_affine(x, L, dj, dmj, nmax)
    head = torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), packed], dim=1)
    return head, _from_columns(L, nb)


def _quantize_q4_k(blocks: torch.Tensor, qw: torch.Tensor | None, exact: bool) -> torch.Tensor:
    head, L = _q4_q5_k(blocks, qw, 15, -1.0, 20, exact)
    L = L.reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([head, qs.to(torch.uint8)], dim=1)


def _quantize_q5_k(blocks: torch.Tensor, qw: torch.Tensor | None, exact: bool) -> torch.Tensor:
    head, L = _q4_q5_k(blocks, qw, 31, -0.5, 15, exact)
    L = L.reshape(-1, 4, 2, 32)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    high = (L >> 4) & 1
    shifts = torch.arange(8, device=L.device, dtype=L.dtype).reshape(1, 4, 2, 1)
    qh = (high << shifts).sum(dim=(1, 2))
    return torch.cat([head, qh.to(torch.uint8), qs.to(torch.uint8)], dim=1)


def _quantize_q6_k(blocks: torch.Tensor, qw: torch.Tensor | None, exact: bool) -> torch.Tensor:
    """Q6_K; with an importance matrix its raw values are the search weights (no sigma2 term), the rest is
    the reference path."""
    nb = blocks.shape[0]
    x = _to_columns(blocks, 16)
    scales, L = _make_qx(x, 32, exact, None if qw is None else _to_columns(qw, 16))
    scales = scales.reshape(nb, 16)
    max_scale = _first_absmax(scales.T)
    empty = max_scale.abs() < _GROUP_MAX_EPS
    safe = torch.where(empty, torch.ones_like(max_scale), max_scale)
    iscale = _cdiv(-128.0, safe)
    d = _fp16_round(_cdiv(1.0, iscale))
    sc = _nearest_int(iscale[:, None] * scales).clamp_(max=127)
    sc = ((sc + 128) & 0xFF) - 128
    dj = (d[:, None] * sc.to(torch.float32)).reshape(1, -1)
    zero = dj == 0
    q = _nearest_int(x / torch.where(zero, torch.ones_like(dj), dj)).clamp_(-32, 31) + 32
    L = _from_columns(torch.where(zero, L.to(q.dtype), q), nb).reshape(nb, 2, 4, 32)
    ql = torch.cat([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4),
                    L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], dim=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), sc.to(torch.int8).view(torch.uint8),
                     _fp16_bytes(d)], dim=1)
    return torch.where(empty[:, None], torch.zeros_like(out), out)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K value packing: per 128 values, byte l holds elements l, l+32, l+64, l+96 (2 bits each)."""
    L = L.reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64).to(torch.uint8)


def _quantize_q2_k(blocks: torch.Tensor, qw: torch.Tensor | None, exact: bool) -> torch.Tensor:
    """Q2_K; with an importance matrix quantize_row_q2_K_impl: a finer search and make_qp_quants for the 4-bit
    scales and mins."""
    nb = blocks.shape[0]
    x = _to_columns(blocks, 16)
    if qw is None:
        scales, mins, L = _make_qkx2(x, x.abs(), 3, -0.5, 0.1, 15, True, exact)
        scales = scales.reshape(nb, 16)
        mins = mins.reshape(nb, 16)
        max_scale = _max_positive(scales)
        max_min = _max_positive(mins)
        has_scale = max_scale > 0
        has_min = max_min > 0
        iscale = _cdiv(15.0, torch.where(has_scale, max_scale, 1.0))
        imin = _cdiv(15.0, torch.where(has_min, max_min, 1.0))
        ls = torch.where(has_scale[:, None], _nearest_int(iscale[:, None] * scales), 0)
        lm = torch.where(has_min[:, None], _nearest_int(imin[:, None] * mins), 0)
        d = torch.where(has_scale, _fp16_round(_divc(max_scale, 15.0)), 0.0)
        dmin = torch.where(has_min, _fp16_round(_divc(max_min, 15.0)), 0.0)
    else:
        w = _to_columns(_imatrix_weights(blocks, qw, _row_sigma2(blocks, twice=False)), 16)
        sw = _seq_sum(w).reshape(nb, 16).T
        scales, mins, L = _make_qkx2(x, w, 3, -0.9, 0.05, 36, False, exact, fused=False)
        d, ls = _make_qp(scales.reshape(nb, 16).T, sw, 15)
        dmin, lm = _make_qp(mins.reshape(nb, 16).T, sw, 15)
        ls, lm = ls.T, lm.T
        d, dmin = _fp16_round(d), _fp16_round(dmin)
    byte = (ls & 0xFF) | ((lm << 4) & 0xFF)
    dj = (d[:, None] * (byte & 0xF).to(torch.float32)).reshape(1, -1)
    dmj = (dmin[:, None] * (byte >> 4).to(torch.float32)).reshape(1, -1)
    L = _from_columns(_requant_affine(x, L, dj, dmj, 3), nb)
    return torch.cat([byte.to(torch.uint8), _pack_2bit(L), _fp16_bytes(d), _fp16_bytes(dmin)], dim=1)


def _quantize_q3_k(blocks: torch.Tensor, qw: torch.Tensor | None, exact: bool) -> torch.Tensor:
    """Q3_K; with an importance matrix quantize_row_q3_K_impl: weighted make_qx_quants for the values, and again
    (weighted by the sub-block weight sums) for the 6-bit scales."""
    nb = blocks.shape[0]
    x = _to_columns(blocks, 16)
    if qw is None:
        scales, L = _make_q3(x, 4)
        scales = scales.reshape(nb, 16)
        max_scale = _first_absmax(scales.T)
        has = max_scale != 0
        iscale = _cdiv(-32.0, torch.where(has, max_scale, 1.0))
        ls = _nearest_int(iscale[:, None] * scales)
        ls = (((ls + 128) & 0xFF) - 128).clamp_(-32, 31) + 32
        ls = torch.where(has[:, None], ls, 0)
        d = torch.where(has, _fp16_round(_cdiv(1.0, iscale)), 0.0)
    else:
        w = _to_columns(_imatrix_weights(blocks, qw, _row_sigma2(blocks, twice=True)), 16)
        scales, L = _make_qx(x, 4, exact, w)
        d, ls = _make_qx(scales.reshape(nb, 16).T, 32, exact, _seq_sum(w).reshape(nb, 16).T)
        ls, L, d = ls.T.to(torch.int32), L.to(torch.int32), _fp16_round(d)
    low = ls & 0xF
    packed_low = low[:, :8] | (low[:, 8:] << 4)
    hi = (ls >> 4).reshape(nb, 4, 4)
    packed_hi = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    dj = (d[:, None] * (ls - 32).to(torch.float32)).reshape(1, -1)
    zero = dj == 0
    q = _nearest_int(x / torch.where(zero, torch.ones_like(dj), dj)).clamp_(-4, 3) + 4
    L = _from_columns(torch.where(zero, L, q), nb)
    high = (L > 3).to(torch.int32).reshape(nb, 8, 32)
    shifts = torch.arange(8, device=L.device, dtype=torch.int32).reshape(1, 8, 1)
    hmask = (high << shifts).sum(dim=1)
    L = torch.where(L > 3, L - 4, L)
    return torch.cat([hmask.to(torch.uint8), _pack_2bit(L), packed_low.to(torch.uint8),
                      packed_hi.to(torch.uint8), _fp16_bytes(d)], dim=1)


def _pack_nibbles(L: torch.Tensor) -> torch.Tensor:
    """Q4_0/Q4_1/IQ4 value packing of (..., 32) levels: byte j holds element j (low nibble) and j + 16 (high)."""
    return ((L[..., :16] & 0xF) | ((L[..., 16:] & 0xF) << 4)).to(torch.uint8)


def _quantize_iq4_nl(blocks: torch.Tensor, qw: torch.Tensor | None, exact: bool) -> torch.Tensor:
    """IQ4_NL (32-value blocks: fp16 d, 16 bytes of grid indices) as quantize_iq4_nl writes it."""
    tables = _iq4_tables(blocks.device)
    x = blocks.T.contiguous()
    scale = _iq4_scales(x, _iq4_weights(blocks, qw).T.contiguous(), tables)
    nonzero = scale != 0
    inv = torch.where(nonzero, _cdiv(1.0, torch.where(nonzero, scale, 1.0)), 0.0)
    L = _iq4_nearest(x * inv, tables)[0].T.to(torch.int32)
    return torch.cat([_fp16_bytes(scale), _pack_nibbles(L)], dim=1)


def _quantize_iq4_xs(blocks: torch.Tensor, qw: torch.Tensor | None, exact: bool) -> torch.Tensor:
    """IQ4_XS (256-value super-blocks: fp16 d, 8 six-bit sub-block scales split in scales_h (2 bits each) and
    scales_l (4 bits each), 128 bytes of grid indices) as quantize_iq4_xs writes it."""
    nb = blocks.shape[0]
    tables = _iq4_tables(blocks.device)
    x = _to_columns(blocks, 32)
    scales = _iq4_scales(x, _to_columns(_iq4_weights(blocks, qw), 32), tables).reshape(nb, 8)
    d = _divc(-_first_absmax(scales.T), 32.0)
    inv = torch.where(d != 0, _cdiv(1.0, torch.where(d != 0, d, 1.0)), 0.0)
    ls = _nearest_int(inv[:, None] * scales).clamp_(-32, 31)
    dl = (d[:, None] * ls.to(torch.float32)).reshape(1, -1)
    inv_l = torch.where(dl != 0, _cdiv(1.0, torch.where(dl != 0, dl, 1.0)), 0.0)
    L = _from_columns(_iq4_nearest(x * inv_l, tables)[0].to(torch.int32), nb).reshape(nb, 8, 32)
    ls = ls + 32
    scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
    shifts = 2 * torch.arange(8, device=ls.device, dtype=ls.dtype)
    scales_h = ((ls >> 4) << shifts).sum(dim=1, keepdim=True)
    head = torch.cat([scales_h & 0xFF, scales_h >> 8, scales_l], dim=1).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), head, _pack_nibbles(L).reshape(nb, 128)], dim=1)


def _legacy_columns(rows: torch.Tensor, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole rows (R, n) of a legacy type as 32-value columns (32, R*n/32), with their importance weights:
    qw * sqrt(sigma2 + x^2) where sigma2 = sum(x^2)/n over the row (quantize_row_q4_0_impl and its siblings)."""
    if qw is None:
        raise ValueError("the legacy types come here only with an importance matrix")
    sigma2 = _divc(_seq_sum(rows * rows, dim=1), float(rows.shape[1]))
    return _to_columns(rows, 32), _to_columns(_imatrix_weights(rows, qw, sigma2), 32)


def _qh_bytes(L: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's qh of (M, 32) levels: bit j of the little-endian uint32 is the 5th bit of element j."""
    bits = ((L >> 4) & 1).reshape(-1, 4, 8)
    return (bits << torch.arange(8, device=L.device, dtype=L.dtype)).sum(dim=2).to(torch.uint8)


def _quantize_q4_0(rows: torch.Tensor, qw: torch.Tensor | None, exact: bool) -> torch.Tensor:
    x, w = _legacy_columns(rows, qw)
    d, L = _make_qx(x, 8, exact, w)
    return torch.cat([_fp16_bytes(d), _pack_nibbles(L.T.to(torch.int32))], dim=1).reshape(rows.shape[0], -1)


def _quantize_q5_0(rows: torch.Tensor, qw: torch.Tensor | None, exact: bool) -> torch.Tensor:
    x, w = _legacy_columns(rows, qw)
    d, L = _make_qx(x, 16, exact, w)
    L = L.T.to(torch.int32)
    return torch.cat([_fp16_bytes(d), _qh_bytes(L), _pack_nibbles(L)], dim=1).reshape(rows.shape[0], -1)


def _legacy_affine(rows: torch.Tensor, qw: torch.Tensor | None, nmax: int,
                   exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1 with an importance matrix: make_qkx3_quants per block; fp16 d and m (M, 4) and levels (M, 32)."""
    x, w = _legacy_columns(rows, qw)
    scale, neg_min, L = _make_qkx2(x, w, nmax, -0.9, 0.05, 36, False, exact, fused=False)
    return torch.cat([_fp16_bytes(scale), _fp16_bytes(-neg_min)], dim=1), L.T.to(torch.int32)


def _quantize_q4_1(rows: torch.Tensor, qw: torch.Tensor | None, exact: bool) -> torch.Tensor:
    head, L = _legacy_affine(rows, qw, 15, exact)
    return torch.cat([head, _pack_nibbles(L)], dim=1).reshape(rows.shape[0], -1)


def _quantize_q5_1(rows: torch.Tensor, qw: torch.Tensor | None, exact: bool) -> torch.Tensor:
    head, L = _legacy_affine(rows, qw, 31, exact)
    return torch.cat([head, _qh_bytes(L), _pack_nibbles(L)], dim=1).reshape(rows.shape[0], -1)


_Quantizer = Callable[[torch.Tensor, torch.Tensor | None, bool], torch.Tensor]
_QUANTIZERS: dict[T, tuple[int, _Quantizer]] = {
    T.Q2_K: (QK_K, _quantize_q2_k),
    T.Q3_K: (QK_K, _quantize_q3_k),
    T.Q4_K: (QK_K, _quantize_q4_k),
    T.Q5_K: (QK_K, _quantize_q5_k),
    T.Q6_K: (QK_K, _quantize_q6_k),
    T.IQ4_NL: (32, _quantize_iq4_nl),
    T.IQ4_XS: (QK_K, _quantize_iq4_xs),
    T.Q4_0: (0, _quantize_q4_0),
    T.Q4_1: (0, _quantize_q4_1),
    T.Q5_0: (0, _quantize_q5_0),
    T.Q5_1: (0, _quantize_q5_1),
}
"""Per torch-quantized type: the values quantized as one unit (0: a whole row, whose sum of squares the legacy
importance-matrix searches use) and fn(units (U, unit) float32, importance weights (U, unit) or None, exact)
-> bytes (U, unit bytes)."""


def _screen(chunk: torch.Tensor) -> bool:
    """Refuse NaN/inf (clear error), then say whether the search loops may meet huge or tiny values, where
    only the bit-exact nearest_int reproduces C. Values between 1e-20 and 1e20 in magnitude (or zero) keep
    every rounded quantity within a few units of nmax."""
    a = chunk.abs()
    top = float(a.amax())
    if not math.isfinite(top):
        _check_finite(chunk)
    if top > 1e20:
        return True
    return bool(a.masked_fill_(a == 0, 1.0).amin() < 1e-20)


def default_device() -> str:
    """"cuda" when a CUDA GPU is usable, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def warm_up(qtypes: Iterable[T], device: str) -> None:
    """Quantize one small random tensor per K-quant type of ``qtypes`` on ``device``. On a GPU this builds the
    fused kernels (Triton compiles them in seconds on a fresh machine, and loads them from its cache in each
    new process) ahead of the real work: see ``convert.prepare``. A failure here is left for the real work to
    report."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(8, 256, generator=generator).to(torch.bfloat16)
    for qtype in dict.fromkeys(q for q in qtypes if q in K_QUANTS):
        try:
            quantize(sample, qtype, device=device)
        except Exception as exc:  # noqa: BLE001 - the chunk that needs the kernel raises it properly
            logger.debug("warm-up of %s on %s failed: %s", qtype.name, device, exc)


def _check_finite(t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise UserError(
            f"The tensor being quantized holds {bad} NaN or infinite value(s), which no GGUF type can "
            "store meaningfully. The model weights are corrupt (often a diverged fine-tune or a bad "
            "merge): check the checkpoint, e.g. with torch.isfinite on each weight, and re-export it."
        )


def _check_weights(weights: torch.Tensor | np.ndarray, shape: torch.Size) -> torch.Tensor:
    """The importance matrix as float32 on the CPU, shaped (1 or experts, row_len), or a clear error when it
    cannot belong to a tensor of ``shape`` or holds values no imatrix can (llama.cpp refuses non-finite ones)."""
    w = torch.from_numpy(np.ascontiguousarray(weights)) if isinstance(weights, np.ndarray) else torch.as_tensor(weights)
    w = w.detach().to(device="cpu", dtype=torch.float32)
    given = tuple(w.shape)
    experts = shape[0] if len(shape) == 3 else 1
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[1] != shape[-1] or w.shape[0] not in (1, experts):
        per_expert = f", or one such row per expert ({experts}, {shape[-1]})" if experts > 1 else ""
        raise UserError(f"The importance matrix given for a tensor of shape {tuple(shape)} has shape {given}; it "
                        f"needs one value per input column ({shape[-1]},){per_expert}. It was probably computed "
                        "for another model or matched to the wrong tensor: recompute it on this model or pass the "
                        "entry named after this tensor.")
    bad = int((~torch.isfinite(w) | (w < 0)).sum())
    if bad:
        raise UserError(f"The importance matrix given for a tensor of shape {tuple(shape)} holds {bad} negative, "
                        "NaN or infinite value(s); its entries are mean squared activations, never negative. The "
                        "imatrix file is corrupt or was not made by llama-imatrix: recompute it.")
    return w


_TORCH_FLOATS = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def encode(x: torch.Tensor, qtype: T, device: str | None = None,
           weights: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """The bytes of ``x`` (rows of one tensor, in any float dtype) as a GGUF file stores them as ``qtype``.
    Float types use torch's casts (round-to-nearest-even, the same bits as gguf-py's numpy code for finite
    values, several times faster); block types go to :func:`quantize` (with the imatrix ``weights``)."""
    if qtype not in _TORCH_FLOATS:
        return quantize(x, qtype, device=device, weights=weights)
    if not bool(torch.isfinite(x.sum())):  # a NaN or Inf anywhere makes the sum non-finite (cheap check)
        return quantize(x, qtype, device=device)  # checks exactly; raises its UserError on NaN/Inf
    return x.to(_TORCH_FLOATS[qtype]).contiguous().view(torch.uint8).numpy()


def quantize(x: torch.Tensor | np.ndarray, qtype: T, device: str | None = None,
             weights: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Quantize x of shape (..., row_len) to ``qtype``, laid out as gguf-py's ``gguf.quants.quantize`` does.

    Returns uint8 bytes shaped (..., row_bytes) for block types, and the typed array (float32,
    float16, or uint16-viewed bf16 as gguf-py returns it) for F32/F16/BF16. ``weights`` is the tensor's
    importance matrix (llama.cpp's quant_weights: in_sum2 / count per input column, shape (row_len,), or one
    row per expert for a 3-D expert tensor); None gives llama-quantize's bytes without an imatrix. K-quants,
    IQ4 and (with weights) the legacy Q4_0/Q4_1/Q5_0/Q5_1 run on ``device`` ("cpu" or "cuda"; default: cuda
    when available); the rest use gguf-py on the CPU, which ignores weights as llama.cpp does.
    """
    qtype = T(qtype)
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.detach()
    if not t.is_floating_point():
        raise UserError(f"Cannot quantize a {t.dtype} tensor: only floating-point weights can be quantized.")
    if t.ndim == 0:
        t = t.reshape(1)
    if qtype not in TORCH_TYPES and qtype not in GGUF_PY_TYPES:
        raise UserError(f"Quantizing to {qtype.name} is not supported; choose one of "
                        f"{', '.join(q.name for q in (*TORCH_TYPES, *GGUF_PY_TYPES))}.")
    block, type_size = GGML_QUANT_SIZES[qtype]
    row_len = t.shape[-1]
    if row_len % block != 0:
        raise UserError(f"A row of {row_len} values cannot be stored as {qtype.name}, whose blocks hold "
                        f"{block} values; pick a type with a smaller block (the recipes do this automatically).")
    flat = t.reshape(-1, row_len)
    qw = None if weights is None else _check_weights(weights, t.shape)
    if qtype not in TORCH_TYPES and (qw is None or qtype not in LEGACY_TYPES):
        return _quantize_gguf_py(flat, qtype).reshape(*t.shape[:-1], -1)
    dev = torch.device(device or default_device())
    unit, fn = _QUANTIZERS[qtype]
    unit = unit or row_len
    units = flat.reshape(-1, unit)
    out = np.empty((units.shape[0], unit // block * type_size), dtype=np.uint8)
    step = max(1, _CHUNK_BLOCKS.get(dev.type, 4096) * QK_K // unit)
    if qw is not None:
        per_row = row_len // unit
        per_matrix = max(1, units.shape[0] // qw.shape[0])  # units of one expert: each has its own weights
        unit_weights = qw.reshape(-1, unit).to(dev)
    for start in range(0, units.shape[0], step):
        chunk = units[start:start + step].to(dev).to(torch.float32)  # 16-bit over the bus, then widened
        chunk_weights = None
        if qw is not None:
            index = torch.arange(start, start + chunk.shape[0], device=dev)
            chunk_weights = unit_weights[index // per_matrix * per_row + index % per_row]
        out[start:start + chunk.shape[0]] = _to_host(fn(chunk, chunk_weights, _screen(chunk)))
    return out.reshape(*t.shape[:-1], (row_len // block) * type_size)


_staging = threading.local()


def _to_host(packed: torch.Tensor) -> np.ndarray:
    """The quantized bytes as a numpy array. From a GPU they go through a page-locked buffer kept per thread:
    a copy from device memory into ordinary (pageable) memory runs at a fraction of the bus speed."""
    if not packed.is_cuda:
        return packed.numpy()
    n = packed.numel()
    buffer = getattr(_staging, "buffer", None)
    if buffer is None or buffer.numel() < n:
        buffer = _staging.buffer = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host = buffer[:n].view(packed.shape)
    host.copy_(packed, non_blocking=True)
    torch.cuda.current_stream(packed.device).synchronize()
    return host.numpy()


def _quantize_gguf_py(flat: torch.Tensor, qtype: T) -> np.ndarray:
    """Types gguf-py quantizes byte-exactly, fed in row chunks of float32."""
    rows_per_chunk = max(1, _ROW_CHUNK_ELEMS // max(1, flat.shape[1]))
    parts = []
    for start in range(0, flat.shape[0], rows_per_chunk):
        chunk = flat[start:start + rows_per_chunk].to(device="cpu", dtype=torch.float32)
        _check_finite(chunk)
        with np.errstate(over="ignore", invalid="ignore"):  # scales beyond fp16 overflow, as in C
            parts.append(gguf_quants.quantize(chunk.numpy(), qtype))
    return np.concatenate(parts, axis=0)
