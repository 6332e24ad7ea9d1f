"""GEMM + all-reduce with the partial sums passed along a ring and added in cuBLAS's epilogue:
tdcompile/kernels/gemm_all_reduce_chain.py.

``gpu``: one GPU, simulated ranks (SimWorld; the pushes and pulls then run as same-device copies,
the protocol is the same).  What must hold: every rank returns the same bits; they are the sum of
every rank's product, rounded once per hop in chain order (the reference below replays that
order with the same cuBLAS calls); back-to-back calls of changing shape reuse the receive area;
CUDA-graph replays; a peer that never arrives raises naming the op and the rank.  The offline
PTX check needs only Triton (``pytest --noconftest -m gpu -k ptx <this file>`` on a CPU machine)."""
import random

import pytest
import torch
from sim_ranks import capture_and_replay, poison, warm_streams, world  # noqa: E402  (tests/gpu helpers)


def bounds_of(M, W, L):
    from tdcompile.ops.overlap import chunk_bounds
    return chunk_bounds(M, W * L)


def chain_reference(as_, b, bounds, W):
    """Chunk c starts at rank c+1 (plain cuBLAS) and each later rank adds its product with
    ``addmm_`` (beta = 1), ending at its owner c % W: the kernel's order and roundings."""
    M, N = as_[0].shape[0], b.shape[1]
    out = torch.empty((M, N), dtype=as_[0].dtype, device="cuda")
    for c, (lo, hi) in enumerate(bounds):
        first = (c % W + 1) % W
        acc = torch.mm(as_[first][lo:hi], b)
        for p in range(1, W):
            acc.addmm_(as_[(first + p) % W][lo:hi], b)
        out[lo:hi] = acc
    return out


def fp32_sum(as_, b):
    return sum(a.float() @ b.float() for a in as_)


def _calls(ws, as_, b, bounds_list, outs=None):
    from tdcompile.kernels.gemm_all_reduce_chain import gemm_all_reduce_chain
    got = []
    for i, (a, bounds) in enumerate(zip(as_, bounds_list)):
        got.append((yield from gemm_all_reduce_chain(ws, a, b, None, bounds, out=None if outs is None else outs[i])))
    return got


# ------------------------------------------------------------------------------ offline (no GPU needed)
@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4, 8])
def test_ptx_waits_are_bounded(W):
    pytest.importorskip("triton")
    from offline_ptx import ptx
    from tdcompile.kernels import gemm_all_reduce_chain as k
    common = {"pad_tab": "*i64"}
    p = ptx(k._chain_wait, {**common, "off": "i32", "src": "i32", "epoch_ptr": "*i32", "err_addr": "i64",
                            "err_code": "i32", "rank": "i32", "timeout_us": "i32"}, {}, 1, aligned=False)
    assert "%globaltimer" in p and "ld.acquire.sys" in p
    p = ptx(k._chain_prev, {**common, "pad_off": "i32", "epoch_ptr": "*i32", "err_addr": "i64", "err_code": "i32",
                            "rank": "i32", "timeout_us": "i32"}, {"WORLD": W}, 1, aligned=False)
    assert "%globaltimer" in p and "ld.acquire.sys" in p


@pytest.mark.gpu
def test_unsupported_inputs_are_named():
    pytest.importorskip("triton")
    from types import SimpleNamespace
    from tdcompile.kernels.gemm_all_reduce_chain import unsupported_reason
    ws, bf = SimpleNamespace(max_m=4096, world=2), torch.bfloat16
    a, b = torch.empty(1024, 64, dtype=bf), torch.empty(64, 1000, dtype=bf)
    assert unsupported_reason(ws, a, b, bounds_of(1024, 2, 2)) is None
    assert "bias" in unsupported_reason(ws, a, b, bounds_of(1024, 2, 2), torch.empty(1000, dtype=bf))
    assert "multiple of the world size" in unsupported_reason(ws, a, b, [(0, 512), (512, 800), (800, 1024)])
    assert "max M" in unsupported_reason(ws, torch.empty(8192, 64, dtype=bf), b, bounds_of(8192, 2, 2))
    assert "dtypes" in unsupported_reason(ws, a.float(), b, bounds_of(1024, 2, 2))


# ------------------------------------------------------------------------------ simulated ranks
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("W", [2, 4])
def test_back_to_back_calls_give_every_rank_the_chain_sum(W, dtype):
    """Several calls in flight (no host sync between them), M not a multiple of the chunk, L = 1, 2, 4."""
    sim = world(W, "chain")
    rnd = random.Random(W)
    K, N = 256, 1000
    b = (torch.randn(N, K, device="cuda") * 0.05).to(dtype).t()                      # [K, N]
    Ls = [1, 2, 4, 1, 2]
    Ms = [rnd.choice([M for M in (1024, 1500, 2048, 2100, 3000, 4096) if bounds_of(M, W, L)]) for L in Ls]
    bounds = [bounds_of(M, W, L) for M, L in zip(Ms, Ls)]
    as_ = [[torch.randn(M, K, device="cuda").to(dtype) * (r + 1) for M in Ms] for r in range(W)]
    refs = [chain_reference([as_[r][i] for r in range(W)], b, bd, W) for i, bd in enumerate(bounds)]
    warm_streams(sim, dtype)
    got = sim.run(lambda ws, al: _calls(ws, al, b, bounds), [(as_[r],) for r in range(W)])
    sim.check()
    for i, ref in enumerate(refs):
        exact = fp32_sum([as_[r][i] for r in range(W)], b)
        for r in range(W):
            assert torch.equal(got[r][i], got[0][i]), (i, r)                          # the same bits everywhere
            torch.testing.assert_close(got[r][i].float(), ref.float(), rtol=2e-2, atol=2e-2)
            err = ((got[r][i].float() - exact).norm() / exact.norm()).item()
            assert err < 1e-2, (i, r, err)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_a_given_output_is_written_and_returned(W):
    sim = world(W, "chain")
    dtype, K, N, M = torch.bfloat16, 256, 512, 1536
    b = (torch.randn(N, K, device="cuda") * 0.05).to(dtype).t()
    bd = bounds_of(M, W, 2 if W == 2 else 1)
    as_ = [torch.randn(M, K, device="cuda").to(dtype) * (r + 1) for r in range(W)]
    outs = [poison(torch.empty((M, N), device="cuda", dtype=dtype)) for _ in range(W)]
    warm_streams(sim, dtype)
    got = sim.run(lambda ws, a, o: _calls(ws, [a], b, [bd], outs=[o]), [(as_[r], outs[r]) for r in range(W)])
    sim.check()
    assert all(got[r][0] is outs[r] for r in range(W))
    assert all(torch.equal(outs[r], outs[0]) for r in range(W)) and not outs[0].isnan().any()


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays(W):
    sim = world(W, "chain")
    dtype, K, N, M = torch.bfloat16, 128, 512, 2048
    b = (torch.randn(N, K, device="cuda") * 0.05).to(dtype).t()
    bd = bounds_of(M, W, 2)
    as_ = [torch.randn(M, K, device="cuda").to(dtype) * (r + 1) for r in range(W)]
    outs = [None] * W

    def body():
        got = sim.run(lambda ws, a: _calls(ws, [a, a], b, [bd, bd]), [(as_[r],) for r in range(W)])
        for r in range(W):
            outs[r] = got[r][1]

    ref = chain_reference(as_, b, bd, W)
    warm_streams(sim, dtype)
    g = capture_and_replay(sim, body, outs)
    assert all(torch.equal(o, outs[0]) for o in outs) and not outs[0].isnan().any()
    torch.testing.assert_close(outs[0].float(), ref.float(), rtol=2e-2, atol=2e-2)
    for r in range(W):                                   # new inputs, same buffers
        as_[r].copy_(torch.randn(M, K, device="cuda").to(dtype))
    g.replay()
    sim.check()
    exact = fp32_sum(as_, b)
    assert ((outs[0].float() - exact).norm() / exact.norm()).item() < 1e-2
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.gpu
def test_peer_never_arrives():
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(2, timeout_s=0.2)
    a = torch.randn(1024, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    sim.run(lambda ws: _calls(ws, [a], b, [bounds_of(1024, 2, 2)]), [()], ranks=[0])    # rank 1 never calls
    with pytest.raises(RuntimeError, match=r"gemm_all_reduce: rank 0 timed out"):
        sim.check()
