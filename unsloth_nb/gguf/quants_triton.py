"""The K-quant scale searches as fused Triton kernels for CUDA, step for step what ``quants`` does in torch.

On a GPU the eager search is bound by launching ~20 small torch operations per trial scale; here one kernel
runs a whole search per sub-block in registers. Byte-exactness needs C's float32 arithmetic: every division
is IEEE round-to-nearest (``div_rn``; Triton's ``/`` is approximate), kernels are compiled without FMA
contraction, and every sum runs over the sub-block's elements in order. Only the common case comes here
(finite values between 1e-20 and 1e20 in magnitude, or zero); ``quants`` keeps the rest. Under
``TRITON_INTERPRET=1`` the kernels run on the CPU: the tests check them against the eager code that way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 128
"""Sub-blocks per program."""
_UNROLL: tl.constexpr = tl.constexpr(8)
"""Loops over a sub-block's 16 or 32 elements are unrolled 8 at a time, not fully: fully unrolled, Triton
took 20 s to compile each of the Q4_K and Q5_K searches (about 45 s before a fresh machine's first export),
8 at a time under 1 s."""


@triton.jit
def _round_clamp(v, lo, hi):
    """nearest_int (add and subtract 1.5*2^23, exact for |v| <= 2^22) clamped to [lo, hi]."""
    r = (v + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(r, lo), hi)


@triton.jit
def _qkx2_error(x_ptr, w_ptr, offs, mask, m, iscale, lmin, scale, offset, N: tl.constexpr, NMAX: tl.constexpr,
                USE_MAD: tl.constexpr):
    """sum(w * |scale*L + offset - x|^p) in order, p = 1 with USE_MAD else 2, for L = round(iscale*(x - lmin))."""
    error = tl.zeros_like(iscale)
    for i in tl.range(0, N, loop_unroll_factor=_UNROLL):
        xi = tl.load(x_ptr + i * m + offs, mask=mask, other=0.0)
        wi = tl.load(w_ptr + i * m + offs, mask=mask, other=0.0)
        li = _round_clamp(iscale * (xi - lmin), 0.0, NMAX)
        diff = (li * scale + offset) - xi
        if USE_MAD:
            diff = tl.abs(diff)
        else:
            diff = diff * diff
        error = error + diff * wi
    return error


@triton.jit
def _qkx2_kernel(x_ptr, w_ptr, factors_ptr, scale_ptr, min_ptr, l_ptr, m, N: tl.constexpr, NMAX: tl.constexpr,
                 NSTEP: tl.constexpr, USE_MAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < m
    x0 = tl.load(x_ptr + offs, mask=mask, other=0.0)
    mn = x0
    mx = x0
    sum_w = tl.zeros([BLOCK], dtype=tl.float32)
    sum_x = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(0, N, loop_unroll_factor=_UNROLL):
        xi = tl.load(x_ptr + i * m + offs, mask=mask, other=0.0)
        wi = tl.load(w_ptr + i * m + offs, mask=mask, other=0.0)
        mn = tl.minimum(mn, xi)
        mx = tl.maximum(mx, xi)
        sum_w = sum_w + wi
        sum_x = sum_x + wi * xi
    mn = tl.where(mn > 0, 0.0, mn)
    mn0 = mn
    flat = mx == mn
    iscale = tl.math.div_rn(tl.full([BLOCK], NMAX, tl.float32), tl.where(flat, 1.0, mx - mn))
    scale = tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32), iscale)
    best_error = _qkx2_error(x_ptr, w_ptr, offs, mask, m, iscale, mn, scale, mn, N, NMAX, USE_MAD)
    best_iscale = tl.where(flat, 0.0, iscale)
    best_mn = mn
    for step in range(NSTEP + 1):
        factor = tl.load(factors_ptr + step)
        iscale = tl.math.div_rn(tl.zeros([BLOCK], dtype=tl.float32) + factor, tl.where(flat, 1.0, mx - mn))
        sum_l = tl.zeros([BLOCK], dtype=tl.float32)
        sum_xl = tl.zeros([BLOCK], dtype=tl.float32)
        sum_l2 = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.range(0, N, loop_unroll_factor=_UNROLL):
            xi = tl.load(x_ptr + i * m + offs, mask=mask, other=0.0)
            wi = tl.load(w_ptr + i * m + offs, mask=mask, other=0.0)
            li = _round_clamp(iscale * (xi - mn), 0.0, NMAX)
            wl = wi * li
            sum_l = sum_l + wl
            sum_xl = sum_xl + wl * xi
            sum_l2 = sum_l2 + wl * li
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = tl.math.div_rn(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = tl.math.div_rn(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive = this_min > 0
        this_min = tl.where(positive, 0.0, this_min)
        this_scale = tl.where(positive, tl.math.div_rn(sum_xl, sum_l2), this_scale)
        cur_error = _qkx2_error(x_ptr, w_ptr, offs, mask, m, iscale, mn, this_scale, this_min, N, NMAX, USE_MAD)
        better = (det > 0) & (cur_error < best_error) & (mx != mn0)
        best_error = tl.where(better, cur_error, best_error)
        best_iscale = tl.where(better, iscale, best_iscale)
        best_mn = tl.where(better, mn, best_mn)
        scale = tl.where(better, this_scale, scale)
        mn = tl.where(better, this_min, mn)
    for i in tl.range(0, N, loop_unroll_factor=_UNROLL):
        xi = tl.load(x_ptr + i * m + offs, mask=mask, other=0.0)
        tl.store(l_ptr + i * m + offs, _round_clamp(best_iscale * (xi - best_mn), 0.0, NMAX), mask=mask)
    tl.store(scale_ptr + offs, tl.where(flat, 0.0, scale), mask=mask)
    tl.store(min_ptr + offs, -mn, mask=mask)


def make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, factors: torch.Tensor,
              use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quants._make_qkx2`` for CUDA columns x, w (n, M) float32: scale (M,), -min (M,), L (n, M) float."""
    n, m = x.shape
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    neg_min = torch.empty_like(scale)
    L = torch.empty_like(x)
    _qkx2_kernel[(triton.cdiv(m, _BLOCK),)](x, w, factors, scale, neg_min, L, m, N=n, NMAX=nmax,
                                           NSTEP=factors.numel() - 1, USE_MAD=use_mad, BLOCK=_BLOCK,
                                           enable_fp_fusion=False)
    return scale, neg_min, L


@triton.jit
def _qx_sums(x_ptr, offs, mask, m, iscale, N: tl.constexpr, NMAX: tl.constexpr):
    """sum(w*x*L) and sum(w*L*L) in order for L = round(iscale * x), w = x*x (make_qx_quants, rmse_type 1)."""
    sumlx = tl.zeros_like(iscale)
    suml2 = tl.zeros_like(iscale)
    for i in tl.range(0, N, loop_unroll_factor=_UNROLL):
        xi = tl.load(x_ptr + i * m + offs, mask=mask, other=0.0)
        wi = xi * xi
        li = _round_clamp(iscale * xi, -NMAX, NMAX - 1)
        sumlx = sumlx + (wi * xi) * li
        suml2 = suml2 + (li * wi) * li
    return sumlx, suml2


@triton.jit
def _qx_kernel(x_ptr, factors_ptr, scale_ptr, l_ptr, m, N: tl.constexpr, NMAX: tl.constexpr,
               NFACTORS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < m
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    mx = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(0, N, loop_unroll_factor=_UNROLL):
        xi = tl.load(x_ptr + i * m + offs, mask=mask, other=0.0)
        take = tl.abs(xi) > amax
        amax = tl.where(take, tl.abs(xi), amax)
        mx = tl.where(take, xi, mx)
    tiny = tl.abs(mx) < 1e-15
    safe = tl.where(tiny, 1.0, mx)
    best_iscale = tl.math.div_rn(tl.full([BLOCK], -NMAX, tl.float32), safe)
    sumlx, suml2 = _qx_sums(x_ptr, offs, mask, m, best_iscale, N, NMAX)
    scale = tl.where(suml2 != 0, tl.math.div_rn(sumlx, tl.where(suml2 != 0, suml2, 1.0)), 0.0)
    best = scale * sumlx
    for k in range(NFACTORS):
        iscale = tl.math.div_rn(tl.zeros([BLOCK], dtype=tl.float32) + tl.load(factors_ptr + k), safe)
        sumlx, suml2 = _qx_sums(x_ptr, offs, mask, m, iscale, N, NMAX)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = tl.where(better, tl.math.div_rn(sumlx, tl.where(better, suml2, 1.0)), scale)
        best_iscale = tl.where(better, iscale, best_iscale)
        best = tl.where(better, scale * sumlx, best)
    for i in tl.range(0, N, loop_unroll_factor=_UNROLL):
        xi = tl.load(x_ptr + i * m + offs, mask=mask, other=0.0)
        li = _round_clamp(best_iscale * xi, -NMAX, NMAX - 1) + NMAX
        tl.store(l_ptr + i * m + offs, tl.where(tiny, 0.0, li), mask=mask)
    tl.store(scale_ptr + offs, tl.where(tiny, 0.0, scale), mask=mask)


def make_qx(x: torch.Tensor, nmax: int, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quants._make_qx`` for CUDA columns x (n, M) float32: scale (M,), L (n, M) float."""
    n, m = x.shape
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    L = torch.empty_like(x)
    _qx_kernel[(triton.cdiv(m, _BLOCK),)](x, factors, scale, L, m, N=n, NMAX=nmax, NFACTORS=factors.numel(),
                                         BLOCK=_BLOCK, enable_fp_fusion=False)
    return scale, L
