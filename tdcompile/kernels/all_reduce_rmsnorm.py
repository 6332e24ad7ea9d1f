"""All-reduce + residual add + RMSNorm in one kernel (decode/prefill epilogue of a TP layer):

    ar           = all_reduce(x)                       # fp32 sum in rank order, cast to dtype
    new_residual = residual + ar                       # in dtype, as HF's `residual + attn_out`
    h            = new_residual.float()
    h            = h * rsqrt(mean(h**2, -1) + eps)
    normed       = weight * h.to(dtype)                # HF Qwen3/Llama RMSNorm: cast, then scale

returns ``(normed, new_residual)``.  Rows are the unit of work: block b handles rows b, b+G, ...
(one row of up to 16384 elements in registers).

* ``one_shot``: [copy-in] -> entry barrier -> each rank pulls whole rows from all W input
  areas, sums, applies the epilogue -> exit barrier.
* ``two_shot``: [copy-in] -> entry barrier -> rank r reduces column slice r of each row
  (width ``SW`` = ceil(N/W) rounded up to 8) into its ``res`` area -> middle barrier -> each
  rank pulls the W slices of the reduced row (slice s from rank s) and applies the epilogue
  to the whole row locally (both outputs are local tensors).

Regions, barriers, per-block device epochs, zero-copy input (``symm_input``) and the buffer
lifetime argument are those of ``all_reduce.py`` (shared regions and flags; see its docstring).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels import all_reduce as arm
from tdcompile.kernels import signals as sig
from tdcompile.kernels.all_reduce import _barrier, _bases, _sum_ranks
from tdcompile.kernels.signals import peer_base, record_error
from tdcompile.kernels.symm import OPS, Workspace, _Unsupported, phased

OP_ID = OPS.index("all_reduce_rmsnorm")
MAX_N = 16384
NUM_WARPS = 8
DEFAULT_CTAS = 128
"""128, not 64: on 2xH200 the 128-CTA grid was as fast or faster at every size, zero copy
4096x5120 one-shot 132.9 vs 145.3 us, two-shot 141.8 vs 216.8 (benchmarks/results/
all_reduce-h200-w2-2026-11-27-full.json).  At most the SM count (all blocks co-resident)."""


@triton.jit
def _epilogue(ar, r, w, cm, eps, N: tl.constexpr, dt: tl.constexpr):
    """HF order of operations: residual add in dtype, norm in fp32, cast, scale in dtype."""
    nr = _add_residual(ar, r, dt)
    return nr, _rmsnorm(nr, w, cm, eps, N, dt)


@triton.jit
def _add_residual(ar, r, dt: tl.constexpr):
    """``residual + ar`` rounded once to dtype (HF's ``residual + hidden_states``)."""
    return (r.to(tl.float32) + ar.to(tl.float32)).to(dt)


@triton.jit
def _rmsnorm(nr, w, cm, eps, N: tl.constexpr, dt: tl.constexpr):
    """HF RMSNorm of one row ``nr`` (dtype): fp32 mean of squares over the N valid columns
    ``cm``, rsqrt(var + eps), cast to dtype, then ``weight *`` in dtype."""
    h = nr.to(tl.float32)
    var = tl.sum(tl.where(cm, h * h, 0.0), axis=0) * (1.0 / N)
    h = h * tl.math.rsqrt(var + eps)
    return (w.to(tl.float32) * h.to(dt).to(tl.float32)).to(dt)


@triton.jit(do_not_specialize=["M", "err_addr", "err_base", "rank", "timeout_us"])
def _ar_rms_one_shot(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, M, eps, buf_tab, sig_tab, my_sig, cnt_ptr,
                     err_addr, err_base, rank, timeout_us, WORLD: tl.constexpr, COPY_IN: tl.constexpr,
                     N: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = out_ptr.dtype.element_ty
    tmo = timeout_us.to(tl.int64) * 1000
    c = tl.load(cnt_ptr + pid)
    b0, b1, b2, b3, b4, b5, b6, b7 = _bases(buf_tab, 0, dt, WORLD)
    cols = tl.arange(0, BLOCK_N)
    cm = cols < N
    if COPY_IN:
        mine = peer_base(buf_tab, rank, dt)
        for row in range(pid, M, G):
            o = row * N + cols
            tl.store(mine + o, tl.load(x_ptr + o, mask=cm), mask=cm)
    ok = _barrier(sig_tab, my_sig, pid, rank, c + 1, tmo, WORLD)
    if ok != 0:
        w = tl.load(w_ptr + cols, mask=cm, other=0.0)
        for row in range(pid, M, G):
            o = row * N + cols
            ar = _sum_ranks(b0, b1, b2, b3, b4, b5, b6, b7, o, cm, WORLD).to(dt)
            r = tl.load(res_ptr + o, mask=cm, other=0.0)
            nr, y = _epilogue(ar, r, w, cm, eps, N, dt)
            tl.store(res_out_ptr + o, nr, mask=cm)
            tl.store(out_ptr + o, y, mask=cm)
    else:
        record_error(err_addr, err_base + sig.WHAT_BARRIER)
    ok2 = _barrier(sig_tab, my_sig, pid, rank, c + 2, tmo * ok, WORLD)
    if ok2 == 0:
        if ok != 0:
            record_error(err_addr, err_base + sig.WHAT_EXIT_BARRIER)
    tl.store(cnt_ptr + pid, c + 2)


@triton.jit(do_not_specialize=["M", "res8", "err_addr", "err_base", "rank", "timeout_us"])
def _ar_rms_two_shot(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, M, eps, res8, buf_tab, sig_tab, my_sig, cnt_ptr,
                     err_addr, err_base, rank, timeout_us, WORLD: tl.constexpr, COPY_IN: tl.constexpr,
                     N: tl.constexpr, BLOCK_N: tl.constexpr, SW: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = out_ptr.dtype.element_ty
    tmo = timeout_us.to(tl.int64) * 1000
    res = res8 * 8
    c = tl.load(cnt_ptr + pid)
    mine = peer_base(buf_tab, rank, dt)
    b0, b1, b2, b3, b4, b5, b6, b7 = _bases(buf_tab, 0, dt, WORLD)
    cols = tl.arange(0, BLOCK_N)
    cm = cols < N
    if COPY_IN:
        for row in range(pid, M, G):
            o = row * N + cols
            tl.store(mine + o, tl.load(x_ptr + o, mask=cm), mask=cm)
    ok = _barrier(sig_tab, my_sig, pid, rank, c + 1, tmo, WORLD)
    sc = tl.arange(0, BLOCK_S)
    if ok != 0:                           # reduce-scatter: column slice `rank` of every row
        for row in range(pid, M, G):
            col = rank * SW + sc
            m = (sc < SW) & (col < N)
            o = row * N + col
            v = _sum_ranks(b0, b1, b2, b3, b4, b5, b6, b7, o, m, WORLD).to(dt)
            tl.store(mine + res + o, v, mask=m)
    else:
        record_error(err_addr, err_base + sig.WHAT_BARRIER)
    ok2 = _barrier(sig_tab, my_sig, pid, rank, c + 2, tmo * ok, WORLD)
    if ok2 != 0:                          # gather the reduced row (slice s from rank s) + epilogue
        w = tl.load(w_ptr + cols, mask=cm, other=0.0)
        for row in range(pid, M, G):
            o = row * N + cols
            ar = _gather_row(b0, b1, b2, b3, b4, b5, b6, b7, res + o, cols, cm, SW, WORLD)
            r = tl.load(res_ptr + o, mask=cm, other=0.0)
            nr, y = _epilogue(ar, r, w, cm, eps, N, dt)
            tl.store(res_out_ptr + o, nr, mask=cm)
            tl.store(out_ptr + o, y, mask=cm)
    else:
        if ok != 0:
            record_error(err_addr, err_base + sig.WHAT_MID_BARRIER)
    tl.store(cnt_ptr + pid, c + 2)


@triton.jit
def _gather_row(b0, b1, b2, b3, b4, b5, b6, b7, o, cols, cm, SW: tl.constexpr, WORLD: tl.constexpr):
    """Row assembled from W column slices (slice s read from rank s): all loads, then selects."""
    m0 = cm & (cols < SW)
    m1 = cm & (cols >= SW) & (cols < 2 * SW)
    u0 = tl.load(b0 + o, mask=m0, other=0.0, cache_modifier=".cg")
    u1 = tl.load(b1 + o, mask=m1, other=0.0, cache_modifier=".cg")
    if WORLD > 2:
        m2 = cm & (cols >= 2 * SW) & (cols < 3 * SW)
        m3 = cm & (cols >= 3 * SW) & (cols < 4 * SW)
        u2 = tl.load(b2 + o, mask=m2, other=0.0, cache_modifier=".cg")
        u3 = tl.load(b3 + o, mask=m3, other=0.0, cache_modifier=".cg")
    if WORLD > 4:
        m4 = cm & (cols >= 4 * SW) & (cols < 5 * SW)
        m5 = cm & (cols >= 5 * SW) & (cols < 6 * SW)
        m6 = cm & (cols >= 6 * SW) & (cols < 7 * SW)
        m7 = cm & (cols >= 7 * SW) & (cols < 8 * SW)
        u4 = tl.load(b4 + o, mask=m4, other=0.0, cache_modifier=".cg")
        u5 = tl.load(b5 + o, mask=m5, other=0.0, cache_modifier=".cg")
        u6 = tl.load(b6 + o, mask=m6, other=0.0, cache_modifier=".cg")
        u7 = tl.load(b7 + o, mask=m7, other=0.0, cache_modifier=".cg")
    v = tl.where(m1, u1, u0)
    if WORLD > 2:
        v = tl.where(m2, u2, v)
        v = tl.where(m3, u3, v)
    if WORLD > 4:
        v = tl.where(m4, u4, v)
        v = tl.where(m5, u5, v)
        v = tl.where(m6, u6, v)
        v = tl.where(m7, u7, v)
    return v


def unsupported_reason(ws: Workspace, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> str | None:
    return arm.unsupported_reason(ws, x) or operand_reason(x, residual, weight)


def operand_reason(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> str | None:
    """What the epilogue needs of residual and weight (shared with the Lamport variant)."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        return "residual shape/dtype differs from x"
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1] or weight.dtype != x.dtype:
        return "weight must be [N] of x's dtype"
    if x.shape[-1] > MAX_N:
        return f"hidden size {x.shape[-1]} > {MAX_N}"
    return None


def launch_config(ws: Workspace, variant: str, M: int, N: int, ctas: int | None = None,
                  num_warps: int | None = None) -> dict:
    from tdcompile.kernels.tiles import num_sms
    W = ws.world
    if variant not in arm.VARIANTS:
        raise ValueError(f"all_reduce_rmsnorm variant must be one of {arm.VARIANTS} or 'auto', got {variant!r}")
    block_n = triton.next_power_of_2(N)
    nw = num_warps or (NUM_WARPS if block_n <= 8192 else 16)
    meta = dict(N=N, BLOCK_N=block_n)
    if variant == "two_shot":
        sw = (triton.cdiv(N, W) + 7) // 8 * 8
        meta.update(SW=sw, BLOCK_S=triton.next_power_of_2(sw))
    limit = num_sms() if ws.sim is None else max(1, num_sms() // W)
    grid = max(1, min(M, ctas or DEFAULT_CTAS, limit, arm.MAX_CTAS))
    return dict(grid=grid, num_warps=nw, meta=meta)


@phased
def all_reduce_rmsnorm(ws: Workspace, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       variant: str = "auto", out: torch.Tensor | None = None,
                       residual_out: torch.Tensor | None = None, ctas: int | None = None,
                       num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(residual + all_reduce(x)) * weight, residual + all_reduce(x))`` over the ranks
    of ``ws``, launched on the current stream.  ``x``, ``residual``: [..., N] bf16/fp16;
    ``weight``: [N]; ``x`` may be the view from ``symm_input`` (zero copy); ``residual_out``
    may be ``residual`` itself (in place)."""
    ws.check()
    reason = unsupported_reason(ws, x, residual, weight)
    if reason:
        raise _Unsupported(reason)
    N = x.shape[-1]
    M = x.numel() // N
    data, sigr, cap = arm.regions(ws, N, x.numel())
    if x.numel() > cap:
        raise _Unsupported(f"{x.numel()} elements > all_reduce input area ({cap})")
    x, zero_copy = arm.prepare_input(ws, x, data)
    residual = residual.contiguous()
    weight = weight.contiguous()
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(x) if residual_out is None else residual_out
    arm.check_out(out, x, data)
    arm.check_out(residual_out, x, data)
    if variant == "auto":
        variant = arm.pick_variant(ws.world, x.numel() * x.element_size())
    cfg = launch_config(ws, variant, M, N, ctas, num_warps)
    sig_tab, flags, cnt = arm.sig_args(sigr)
    head = (x, residual, weight, out, residual_out, M, float(eps))
    tail = (data.ptrs, sig_tab, flags, cnt, ws.err_addr, arm.err_base(OP_ID, ws.rank), ws.rank, ws.timeout_us)
    kw = dict(WORLD=ws.world, COPY_IN=not zero_copy, num_warps=cfg["num_warps"], **cfg["meta"])
    if variant == "one_shot":
        kernel, args = _ar_rms_one_shot, head + tail
    else:
        kernel, args = _ar_rms_two_shot, head + (cap // arm.VEC,) + tail
    grid = (cfg["grid"],)
    from tdcompile.kernels.tiles import preload
    preload(kernel, grid, *args, **kw)
    yield
    kernel[grid](*args, **kw)
    return out, residual_out
