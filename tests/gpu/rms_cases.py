"""The simulated-rank cases both Lamport all-reduce + add + RMSNorm kernels are held to
(``test_all_reduce_rmsnorm_lamport.py``, ``test_all_reduce_rmsnorm_lamport2.py``): each test names
its kernel, the plain all-reduce it shares slots with, and what it checks beyond these.

``rms(ws, x, residual, weight, eps)`` and ``ar(ws, x)`` are the phased launchers."""
import random

import pytest
import torch
from sim_ranks import poison

EPS = 1e-6


def rmsnorm_ref(xs, residual, weight, dtype):
    """HF: fp32 rank-order sum cast once, residual add in dtype, then the norm -> (normed, new_residual)."""
    acc = xs[0].float()
    for x in xs[1:]:
        acc = acc + x.float()
    nr = residual + acc.to(dtype)
    h = nr.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * h.to(dtype), nr


def _calls(ws, plan, rms, ar):
    """Per-rank generator: ``plan`` = [("rms", x, res, w) | ("ar", x)], back to back."""
    got = []
    for item in plan:
        if item[0] == "rms":
            got.append((yield from rms(ws, item[1], item[2], item[3], EPS)))
        else:
            got.append((yield from ar(ws, item[1])))
    return got


def interleaved(sim, W, dtype, rms, ar, *, seed, per_rank_residual):
    """24 back-to-back calls of varying shape (rows not a multiple of W or of 8 elements), ~60%
    ``rms`` and the rest plain ``ar``: the new residual bit for bit, the norm within a few ulps,
    the plain all-reduces bit for bit. ``per_rank_residual``: every rank adds its own."""
    rnd = random.Random(seed + W + 7 * (dtype == torch.float16))
    plan_shapes = [("rms", (rnd.choice([1, 3, 128, 77]), rnd.choice([5120, 1000, 64, 4096, 333]))) if rnd.random() < 0.6
                   else ("ar", (rnd.randint(1, 200), rnd.choice([7, 5120]))) for _ in range(24)]
    inputs = []
    for i, (kind, shape) in enumerate(plan_shapes):
        g = torch.Generator(device="cuda").manual_seed(seed + 100 + i)
        xs = [(torch.randn(shape, device="cuda", generator=g) * (r + 1)).to(dtype) for r in range(W)]
        if kind == "rms":
            res = [torch.randn(shape, device="cuda", generator=g).to(dtype)
                   for _ in range(W if per_rank_residual else 1)]
            w = (1 + 0.1 * torch.randn(shape[-1], device="cuda", generator=g)).to(dtype)
            inputs.append((kind, xs, res * (1 if per_rank_residual else W), w))
        else:
            inputs.append((kind, xs))

    def plan(it, r):
        return ("rms", it[1][r], it[2][r], it[3]) if it[0] == "rms" else ("ar", it[1][r])
    for it in inputs:      # load every kernel variant first (no module load while a simulated peer spins)
        sim.run(lambda ws, p: _calls(ws, [p], rms, ar), [(plan(it, r),) for r in range(W)])
        sim.check()
    got = sim.run(lambda ws, p: _calls(ws, p, rms, ar), [([plan(it, r) for it in inputs],) for r in range(W)])
    sim.check()
    for i, it in enumerate(inputs):
        for r in range(W):
            if it[0] == "rms":
                normed, new_res = got[r][i]
                want_n, want_r = rmsnorm_ref(it[1], it[2][r], it[3], dtype)
                assert torch.equal(new_res, want_r), (i, r, "residual")
                tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
                torch.testing.assert_close(normed.float(), want_n.float(), rtol=tol, atol=tol)
            else:
                acc = it[1][0].float()
                for x in it[1][1:]:
                    acc = acc + x.float()
                assert torch.equal(got[r][i], acc.to(dtype)), (i, r, "all_reduce")


def graph_replays(sim, W, rms, *, same_bits_on_every_rank=False):
    """Two calls per replay (the slot rotation shifts from replay to replay), 10 replays into
    NaN-poisoned outputs: the new residual bit for bit, the norm close (``same_bits_on_every_rank``:
    the norm's bits equal on every rank too)."""
    dtype, shape = torch.bfloat16, (128, 5120)
    xs = [torch.randn(shape, device="cuda").to(dtype) * (r + 1) for r in range(W)]
    res = torch.randn(shape, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(dtype)
    outs = [None] * W

    def body():
        got = sim.run(lambda ws, x: _calls(ws, [("rms", x, res, w), ("rms", x, res, w)], rms, None),
                      [(xs[r],) for r in range(W)])
        for r in range(W):
            outs[r] = got[r][1]

    body()
    sim.check()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    want_n, want_r = rmsnorm_ref(xs, res, w, dtype)
    for _ in range(10):
        for o in outs:
            poison(o[0])
            poison(o[1])
        g.replay()
    sim.check()
    for n, r in outs:
        assert torch.equal(r, want_r)
        if same_bits_on_every_rank:
            assert torch.equal(n, outs[0][0])
        torch.testing.assert_close(n.float(), want_n.float(), rtol=1.6e-2, atol=1.6e-2)


def peer_never_arrives(rms):
    """Rank 0 calls, rank 1 never does: a bounded wait, raised naming the op and the rank."""
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(2, timeout_s=0.2)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(512, device="cuda", dtype=torch.bfloat16)
    sim.run(lambda ws: rms(ws, x, x, w, EPS), [()], ranks=[0])
    with pytest.raises(RuntimeError, match=r"all_reduce_rmsnorm: rank 0 timed out"):
        sim.check()
