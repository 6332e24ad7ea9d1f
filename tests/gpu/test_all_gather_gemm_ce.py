"""All-gather + GEMM with cuBLAS per shard and the shards on the copy engine:
tdcompile/kernels/all_gather_gemm_ce.py.

``gpu``: one GPU, simulated ranks.  Every output row block is cuBLAS's ``shard_s @ b`` for the
same [m, K] x [K, N] shapes, so it is compared bit for bit with ``torch.mm(shard_s, b)``; the
gathered A (``return_a``) bit for bit with the concatenation.  Back-to-back calls of changing
shape, calls interleaved with the ``fused`` variant (same shard buffer, barriers and epoch),
graph replays and a peer that never arrives."""
import random

import pytest
import torch
from sim_ranks import poison, world  # noqa: E402  (tests/gpu helper)


def _shards(W, m, K, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [((torch.randn((m, K), device="cuda", generator=g) * (r + 1)) + 0.01 * r).to(dtype) for r in range(W)]


def _weights(K, Ns, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ws = [(torch.randn((N, K), device="cuda", generator=g) * 0.05).to(dtype) for N in Ns]
    return [w.t() if i % 2 else w.t().contiguous() for i, w in enumerate(ws)]      # [K, N], both layouts


def _expect(shards, bs):
    return torch.cat(shards), [torch.cat([torch.mm(s, b) for s in shards]) for b in bs]


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_matches_per_shard_cublas_back_to_back(W):
    """Changing shapes, one to three weights, with and without the gathered A, back to back."""
    from tdcompile.kernels.all_gather_gemm_ce import all_gather_gemm_ce
    sim = world(W, "ag_ce")
    rnd = random.Random(W)
    cases = []
    for i in range(12):
        m, K = rnd.choice([1, 3, 64, 100, 256]), rnd.choice([64, 256, 320])
        Ns = [rnd.choice([64, 192, 512]) for _ in range(1 + i % 3)]
        dtype = torch.bfloat16 if i % 4 else torch.float16
        cases.append((_shards(W, m, K, dtype, 10 + i), _weights(K, Ns, dtype, 50 + i), bool(i % 2)))
    for shards, bs, ret in cases:                       # first calls: compile / warm every shape
        sim.run(lambda ws, s, bs=bs, ret=ret: all_gather_gemm_ce(ws, s, bs, ret), [(shards[r],) for r in range(W)])
        sim.check()

    def all_calls(ws, rank):
        got = []
        for shards, bs, ret in cases:
            got.append((yield from all_gather_gemm_ce(ws, shards[rank], bs, ret)))
        return got

    got = sim.run(all_calls, [(r,) for r in range(W)])
    sim.check()
    for i, (shards, bs, ret) in enumerate(cases):
        A, outs = _expect(shards, bs)
        for r in range(W):
            a_out, c_outs = got[r][i]
            assert (torch.equal(a_out, A) if ret else a_out.numel() == 0), (i, r)
            for c, want in zip(c_outs, outs):
                assert torch.equal(c, want), (i, r)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_interleaves_with_the_fused_variant(W):
    """Both variants share the shard buffer, the barriers and the epoch: alternate them."""
    from tdcompile.kernels.all_gather_gemm import all_gather_gemm
    from tdcompile.kernels.all_gather_gemm_ce import all_gather_gemm_ce
    sim = world(W, "ag_ce")
    shards, bs = _shards(W, 64, 256, torch.bfloat16, 7), _weights(256, [128], torch.bfloat16, 8)
    A, outs = _expect(shards, bs)
    for fn in (all_gather_gemm_ce, all_gather_gemm):        # warm both
        sim.run(lambda ws, s, fn=fn: fn(ws, s, bs, True), [(shards[r],) for r in range(W)])
    sim.check()

    def alternate(ws, rank):
        got = []
        for k in range(6):
            fn = all_gather_gemm_ce if k % 2 == 0 else all_gather_gemm
            got.append((yield from fn(ws, shards[rank], bs, True)))
        return got

    got = sim.run(alternate, [(r,) for r in range(W)])
    sim.check()
    for r in range(W):
        for k, (a_out, c_outs) in enumerate(got[r]):
            assert torch.equal(a_out, A), (r, k)
            torch.testing.assert_close(c_outs[0].float(), outs[0].float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays(W):
    from tdcompile.kernels.all_gather_gemm_ce import all_gather_gemm_ce
    sim = world(W, "ag_ce")
    shards, bs = _shards(W, 128, 512, torch.bfloat16, 3), _weights(512, [256, 64], torch.bfloat16, 4)
    A, outs = _expect(shards, bs)
    res = [None] * W

    def body():     # two calls per replay: the epoch moves from call to call
        for _ in range(2):
            got = sim.run(lambda ws, s: all_gather_gemm_ce(ws, s, bs, True), [(shards[r],) for r in range(W)])
        for r in range(W):
            res[r] = got[r]

    body()
    sim.check()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    for _ in range(10):
        for a_out, c_outs in res:
            poison(a_out)
            for c in c_outs:
                poison(c)
        g.replay()
    sim.check()
    for a_out, c_outs in res:
        assert torch.equal(a_out, A)
        for c, want in zip(c_outs, outs):
            assert torch.equal(c, want)


@pytest.mark.gpu
def test_peer_never_arrives():
    from tdcompile.kernels.all_gather_gemm_ce import all_gather_gemm_ce
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(2, timeout_s=0.2)
    shards, bs = _shards(2, 16, 64, torch.bfloat16, 1), _weights(64, [64], torch.bfloat16, 2)
    sim.run(lambda ws: all_gather_gemm_ce(ws, shards[0], bs), [()], ranks=[0])
    with pytest.raises(RuntimeError, match=r"all_gather_gemm.*rank 0"):
        sim.check()
