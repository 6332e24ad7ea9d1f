"""Fused kernels on ONE GPU with simulated ranks (one buffer + one stream per rank, grids
co-resident).  Reference computed with plain torch on the same GPU.  Rank r's inputs carry
an (r+1) pattern so a wrong accumulation order or a missing rank is visible."""
import os
import random

import pytest
import torch
from sim_ranks import poison, world  # noqa: E402  (tests/gpu helper)

pytestmark = pytest.mark.gpu

os.environ.setdefault("TDCOMPILE_MAX_M", "4096")
TOL = 1e-2
N_CASES = int(os.environ.get("TDCOMPILE_TEST_CASES", "50"))


def rel_err(out, ref):
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), "non-finite values in output (poisoned output not overwritten?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-6)).item()


def rank_input(shape, r, dtype, gen_scale=1.0):
    x = torch.randn(shape, device="cuda", dtype=torch.float32) * gen_scale
    # (r+1) pattern: rank r's values scaled by (r+1) and offset by a rank-specific column ramp
    return (x * (r + 1) + 0.01 * (r + 1)).to(dtype)




def shapes(seed, n=N_CASES):
    """Random (M, N, K): M anything (not a multiple of the tile / world), N, K mostly
    multiples of 64/128 to bound the number of compiled variants, a few odd ones."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        M = rnd.choice([1, 3, 17, 64, 100, 128, 129, 200, 255, 256, 300, 384, 500, 640, 777, 1000, 1024, 1500])
        N = rnd.choice([64, 128, 192, 256, 320, 512, 640, 1024]) if i % 10 else rnd.choice([96, 200, 136])
        K = rnd.choice([128, 256, 384, 512, 1024]) if i % 7 else rnd.choice([64, 192, 200])
        out.append((M, N, K))
    return out


# ------------------------------------------------------------------------------ all_reduce
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_reduce(W, dtype):
    from tdcompile.kernels.all_reduce import all_reduce
    sim = world(W)
    rnd = random.Random(W)
    sizes = [(1, 8), (3, 5120), (128, 5120), (77, 1000), (1, 1), (513, 333)] + \
            [(rnd.randint(1, 700), rnd.choice([64, 100, 512, 5120, 7])) for _ in range(N_CASES)]
    for (m, n) in sizes:
        xs = [rank_input((m, n), r, dtype) for r in range(W)]
        ref = sum(x.float() for x in xs)
        outs = [poison(torch.empty_like(xs[0])) for _ in range(W)]
        sim.run(lambda ws, x, o: all_reduce(ws, x, out=o), [(xs[r], outs[r]) for r in range(W)])
        sim.check()
        for r in range(W):
            assert rel_err(outs[r], ref) <= TOL, (m, n, r)
            assert torch.equal(outs[r], outs[0]), "ranks disagree"


@pytest.mark.parametrize("variant", ["one_shot", "two_shot"])
@pytest.mark.parametrize("W", [2, 4])
def test_all_reduce_each_variant_on_large_and_odd_sizes(W, variant):
    from tdcompile.kernels import all_reduce as arm
    sim = world(W)
    for (m, n) in [(1024, 5120), (333, 5120), (4096, 1000)]:
        xs = [rank_input((m, n), r, torch.bfloat16) for r in range(W)]
        ref = sum(x.float() for x in xs)
        outs = [poison(torch.empty_like(xs[0])) for _ in range(W)]
        sim.run(lambda ws, x, o: arm.all_reduce(ws, x, out=o, variant=variant), [(xs[r], outs[r]) for r in range(W)])
        sim.check()
        for r in range(W):
            assert rel_err(outs[r], ref) <= TOL, (m, n, r, variant)
        assert all(torch.equal(outs[0], o) for o in outs[1:]), "every rank must hold the same bits"


# ------------------------------------------------------------------------------ gemm_all_reduce
@pytest.mark.parametrize("W", [2, 4])
def test_gemm_all_reduce(W):
    from tdcompile.kernels.gemm_all_reduce import gemm_all_reduce
    sim = world(W)
    for i, (M, N, K) in enumerate(shapes(100 + W)):
        dtype = torch.bfloat16 if i % 5 else torch.float16
        a = [rank_input((M, K), r, dtype) for r in range(W)]
        wt = i % 3 == 0                                   # transposed view of a row-major [N, K] weight
        b = [rank_input((N, K), r, dtype, 0.05).t() if wt else rank_input((K, N), r, dtype, 0.05) for r in range(W)]
        bias = [rank_input((N,), r, dtype) for r in range(W)] if i % 4 == 0 else [None] * W
        ref = sum(torch.addmm(bias[r].float(), a[r].float(), b[r].float()) if bias[r] is not None
                  else a[r].float() @ b[r].float() for r in range(W))
        outs = [poison(torch.empty((M, N), device="cuda", dtype=dtype)) for _ in range(W)]
        sim.run(lambda ws, x, y, z, o: gemm_all_reduce(ws, x, y, z, out=o),
                [(a[r], b[r], bias[r], outs[r]) for r in range(W)])
        sim.check()
        for r in range(W):
            assert rel_err(outs[r], ref) <= TOL, (M, N, K, r)
        assert torch.equal(outs[0], outs[-1])


# ------------------------------------------------------------------------------ gemm_reduce_scatter
@pytest.mark.parametrize("W", [2, 4])
def test_gemm_reduce_scatter(W):
    from tdcompile.kernels.gemm_reduce_scatter import gemm_reduce_scatter
    sim = world(W)
    for i, (M, N, K) in enumerate(shapes(200 + W)):
        M = max(W, M - M % W)                              # contract: M divisible by W (M/W need not be /tile)
        dtype = torch.bfloat16 if i % 5 else torch.float16
        a = [rank_input((M, K), r, dtype) for r in range(W)]
        wt = i % 3 == 1
        b = [rank_input((N, K), r, dtype, 0.05).t() if wt else rank_input((K, N), r, dtype, 0.05) for r in range(W)]
        bias = [rank_input((N,), r, dtype) for r in range(W)] if i % 4 == 1 else [None] * W
        full = sum(torch.addmm(bias[r].float(), a[r].float(), b[r].float()) if bias[r] is not None
                   else a[r].float() @ b[r].float() for r in range(W))
        outs = [poison(torch.empty((M // W, N), device="cuda", dtype=dtype)) for _ in range(W)]
        sim.run(lambda ws, x, y, z, o: gemm_reduce_scatter(ws, x, y, z, out=o),
                [(a[r], b[r], bias[r], outs[r]) for r in range(W)])
        sim.check()
        for r in range(W):
            assert rel_err(outs[r], full[r * M // W:(r + 1) * M // W]) <= TOL, (M, N, K, r)


# ------------------------------------------------------------------------------ all_gather_gemm
@pytest.mark.parametrize("W", [2, 4])
def test_all_gather_gemm(W):
    from tdcompile.kernels.all_gather_gemm import all_gather_gemm
    sim = world(W)
    for i, (M, N, K) in enumerate(shapes(300 + W)):
        m = max(1, M // W)
        dtype = torch.bfloat16 if i % 5 else torch.float16
        shards = [rank_input((m, K), r, dtype) for r in range(W)]
        A = torch.cat(shards)
        nb = 1 + i % 3                                     # several weights in one op
        bs = []
        for j in range(nb):
            Nj = N if j == 0 else max(64, N // 2)
            w = torch.randn((Nj, K), device="cuda").to(dtype) * 0.05
            bs.append(w.t() if (i + j) % 2 else w.t().contiguous())
        refs = [A.float() @ b.float() for b in bs]
        res = []
        for r in range(W):
            res.append((poison(torch.empty((W * m, K), device="cuda", dtype=dtype)),
                        [poison(torch.empty((W * m, b.shape[1]), device="cuda", dtype=dtype)) for b in bs]))
        sim.run(lambda ws, s, oa, oc: all_gather_gemm(ws, s, bs, True, out_a=oa, outs=oc),
                [(shards[r], res[r][0], res[r][1]) for r in range(W)])
        sim.check()
        for r in range(W):
            assert torch.equal(res[r][0], A), (M, N, K, r)
            for c, ref in zip(res[r][1], refs):
                assert rel_err(c, ref) <= TOL, (M, N, K, r)


# ------------------------------------------------------------------------------ repeat / graphs
def _run_all(sim, W, inputs, group="all"):
    from tdcompile.kernels.all_gather_gemm import all_gather_gemm
    from tdcompile.kernels.all_reduce import all_reduce
    from tdcompile.kernels.gemm_all_reduce import gemm_all_reduce
    from tdcompile.kernels.gemm_reduce_scatter import gemm_reduce_scatter
    x, a, b, sh = inputs
    outs = []
    if group in ("all", "reduce"):
        outs += sim.run(lambda ws, t: all_reduce(ws, t), [(x[r],) for r in range(W)])
        outs += sim.run(lambda ws, t, u: gemm_all_reduce(ws, t, u), [(a[r], b[r]) for r in range(W)])
        outs += sim.run(lambda ws, t, u: gemm_reduce_scatter(ws, t, u), [(a[r], b[r]) for r in range(W)])
    if group in ("all", "gather"):
        outs += [o[1][0] for o in sim.run(lambda ws, s, u: all_gather_gemm(ws, s, [u]), [(sh[r], b[r]) for r in range(W)])]
    return outs


def _inputs(W, M=256, N=512, K=256):
    x = [rank_input((M, N), r, torch.bfloat16) for r in range(W)]
    a = [rank_input((M, K), r, torch.bfloat16) for r in range(W)]
    b = [rank_input((K, N), r, torch.bfloat16, 0.05) for r in range(W)]
    sh = [rank_input((M // W, K), r, torch.bfloat16) for r in range(W)]
    return x, a, b, sh


@pytest.mark.parametrize("group", ["reduce", "gather"])
@pytest.mark.parametrize("W", [2, 4])
def test_back_to_back_and_graph_replay(W, group):
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(W)
    inputs = _inputs(W)
    first = [o.clone() for o in _run_all(sim, W, inputs, group)]
    for _ in range(20):                                   # back-to-back, no sync in between
        outs = _run_all(sim, W, inputs, group)
    sim.check()
    for o, f in zip(outs, first):
        assert torch.equal(o, f)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gouts = _run_all(sim, W, inputs, group)
    for _ in range(int(os.environ.get("TDCOMPILE_TEST_REPLAYS", "50"))):
        g.replay()
    sim.check()
    for o, f in zip(gouts, first):
        assert torch.equal(o, f)
    # new values in the static inputs: replays must see them (no stale flags or data)
    new = _inputs(W)
    for old_list, new_list in zip(inputs, new):
        for t_old, t_new in zip(old_list, new_list):
            t_old.copy_(t_new)
    expect = [o.clone() for o in _run_all(sim, W, inputs, group)]
    for _ in range(3):
        g.replay()
    sim.check()
    for o, e in zip(gouts, expect):
        assert torch.equal(o, e)


# ------------------------------------------------------------------------------ timeouts
@pytest.mark.parametrize("op", ["all_reduce", "gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm"])
def test_peer_never_arrives(op):
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(2, timeout_s=0.2)
    x, a, b, sh = _inputs(2)
    import tdcompile.kernels.all_gather_gemm as agm
    import tdcompile.kernels.all_reduce as arm
    import tdcompile.kernels.gemm_all_reduce as garm
    import tdcompile.kernels.gemm_reduce_scatter as grsm
    fn = {"all_reduce": lambda ws: arm.all_reduce(ws, x[0]),
          "gemm_all_reduce": lambda ws: garm.gemm_all_reduce(ws, a[0], b[0]),
          "gemm_reduce_scatter": lambda ws: grsm.gemm_reduce_scatter(ws, a[0], b[0]),
          "all_gather_gemm": lambda ws: agm.all_gather_gemm(ws, sh[0], [b[0]])}[op]
    sim.run(lambda ws: fn(ws), [()], ranks=[0])            # rank 1 never calls
    with pytest.raises(RuntimeError, match=rf"{op}.*rank 0"):
        sim.check()
