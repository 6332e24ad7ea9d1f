"""GEMM + reduce-scatter with cuBLAS per destination and the partials pushed by the copy engine:
tdcompile/kernels/gemm_reduce_scatter_ce.py.

``gpu``: one GPU, simulated ranks.  Rank q's partial of rank r's rows is cuBLAS's
``a_q[r rows] @ b (+ bias)`` for the same [m, K] x [K, N] shapes, and the add sums the W partials
in fp32 in rank order and casts once: compared bit for bit with that sum.  Back-to-back calls of
changing shape (the receive slots are reused), with and without bias, graph replays and a peer
that never arrives."""
import random

import pytest
import torch
from sim_ranks import poison, world  # noqa: E402  (tests/gpu helper)


def _inputs(W, M, N, K, dtype, seed, bias):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = [((torch.randn((M, K), device="cuda", generator=g) * (q + 1))).to(dtype) for q in range(W)]
    w = (torch.randn((N, K), device="cuda", generator=g) * 0.05).to(dtype)
    b = w.t() if seed % 2 else w.t().contiguous()                                  # [K, N], both layouts
    bb = (torch.randn(N, device="cuda", generator=g) * 0.1).to(dtype) if bias else None
    return a, b, bb


def _expect(a, b, bias, r, W):
    m = a[0].shape[0] // W
    parts = [torch.mm(x[r * m:(r + 1) * m], b) if bias is None else torch.addmm(bias, x[r * m:(r + 1) * m], b)
             for x in a]
    acc = parts[0].float()
    for p in parts[1:]:
        acc = acc + p.float()
    return acc.to(a[0].dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_matches_the_rank_order_sum_back_to_back(W):
    from tdcompile.kernels.gemm_reduce_scatter_ce import gemm_reduce_scatter_ce
    sim = world(W, "grs_ce")
    rnd = random.Random(W)
    cases = []
    for i in range(12):
        M = W * rnd.choice([1, 3, 64, 100, 256])
        N, K = rnd.choice([64, 192, 512]), rnd.choice([64, 256, 320])
        dtype = torch.bfloat16 if i % 4 else torch.float16
        cases.append(_inputs(W, M, N, K, dtype, 20 + i, bias=bool(i % 3 == 0)))
    for a, b, bias in cases:                            # first calls: compile / warm every shape
        sim.run(lambda ws, x, b=b, bias=bias: gemm_reduce_scatter_ce(ws, x, b, bias), [(a[r],) for r in range(W)])
        sim.check()

    def all_calls(ws, rank):
        got = []
        for a, b, bias in cases:
            got.append((yield from gemm_reduce_scatter_ce(ws, a[rank], b, bias)))
        return got

    got = sim.run(all_calls, [(r,) for r in range(W)])
    sim.check()
    for i, (a, b, bias) in enumerate(cases):
        for r in range(W):
            assert torch.equal(got[r][i], _expect(a, b, bias, r, W)), (i, r)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays(W):
    from tdcompile.kernels.gemm_reduce_scatter_ce import gemm_reduce_scatter_ce
    sim = world(W, "grs_ce")
    a, b, bias = _inputs(W, W * 128, 512, 256, torch.bfloat16, 3, bias=True)
    res = [None] * W

    def body():     # two calls per replay: the epoch moves from call to call
        for _ in range(2):
            got = sim.run(lambda ws, x: gemm_reduce_scatter_ce(ws, x, b, bias), [(a[r],) for r in range(W)])
        for r in range(W):
            res[r] = got[r]

    body()
    sim.check()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    for _ in range(10):
        for o in res:
            poison(o)
        g.replay()
    sim.check()
    for r in range(W):
        assert torch.equal(res[r], _expect(a, b, bias, r, W)), r


@pytest.mark.gpu
def test_rows_not_a_multiple_of_the_world_are_refused():
    from tdcompile.kernels.gemm_reduce_scatter_ce import unsupported_reason
    ws = world(2, "grs_ce").ws[0]
    a = torch.zeros(3, 64, device="cuda", dtype=torch.bfloat16)
    assert "multiple of the world" in unsupported_reason(ws, a, torch.zeros(64, 64, device="cuda",
                                                                             dtype=torch.bfloat16), None)


@pytest.mark.gpu
def test_peer_never_arrives():
    from tdcompile.kernels.gemm_reduce_scatter_ce import gemm_reduce_scatter_ce
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(2, timeout_s=0.2)
    a, b, _ = _inputs(2, 32, 64, 64, torch.bfloat16, 1, bias=False)
    sim.run(lambda ws: gemm_reduce_scatter_ce(ws, a[0], b), [()], ranks=[0])
    with pytest.raises(RuntimeError, match=r"gemm_reduce_scatter.*rank 0"):
        sim.check()
