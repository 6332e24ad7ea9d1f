"""GEMM + all-reduce with the reduction on the copy engine: tdcompile/kernels/gemm_all_reduce_ce.py.

``gpu``: one GPU, simulated ranks (SimWorld; the D2D copies then run as kernels, the protocol
is the same).  Exactness: each output row is reduced once, by its owner, in fp32 in rank order
from the bf16/fp16 cuBLAS outputs of the same row chunks, so it equals bit for bit the rank-order
fp32 sum of ``torch.mm(a_r[lo:hi], b)`` per chunk -- on every rank.  The offline PTX check
needs only Triton (run it on a CPU machine with ``pytest --noconftest -m gpu -k ptx <this file>``)."""
import random

import pytest
import torch
from sim_ranks import capture_and_replay, warm_streams, world  # noqa: E402  (tests/gpu helpers)


def chunked(M, C):
    from tdcompile.ops.overlap import chunk_bounds
    return chunk_bounds(M, C)


def reference(as_, b, bias, bounds, dtype):
    """fp32 rank-order sum of every rank's chunk-wise cuBLAS output, cast once."""
    acc = None
    for a in as_:
        parts = [(torch.mm(a[lo:hi], b) if bias is None else torch.addmm(bias, a[lo:hi], b)) for lo, hi in bounds]
        y = torch.cat(parts).float()
        acc = y if acc is None else acc + y
    return acc.to(dtype)


def _calls(ws, as_, b, bias, bounds_list):
    from tdcompile.kernels.gemm_all_reduce_ce import gemm_all_reduce_ce
    got = []
    for a, bounds in zip(as_, bounds_list):
        got.append((yield from gemm_all_reduce_ce(ws, a, b, bias, bounds)))
    return got


# ------------------------------------------------------------------------------ offline (no GPU needed)
@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4, 8])
def test_ptx_compiles_and_waits_are_bounded(W):
    pytest.importorskip("triton")
    import re
    from offline_ptx import ptx
    from tdcompile.kernels import gemm_all_reduce_ce as k

    sig = {"pad_tab": "*i64", "pad_off": "i32", "slot": "i32", "epoch_ptr": "*i32", "err_addr": "i64",
           "err_code": "i32", "rank": "i32", "timeout_us": "i32"}
    p = ptx(k._ce_barrier, sig, {"WORLD": W}, 1, aligned=False)
    assert "%globaltimer" in p and "ld.acquire.sys" in p and ".release" in p   # bounded acquire spin, release signal
    for dt in ("*bf16", "*fp16"):
        sig = {"stage_ptr": dt, "out_ptr": dt, "res_ptr": dt, "n_arg": "i32", "stride8": "i32"}
        p = ptx(k._ce_add, sig, {"WORLD": W, "EVEN": True, "BLOCK": k.ADD_BLOCK}, 8)
        assert "ld.global.v4.b32" in p and "st.global.v4.b32" in p          # 128-bit, the add is memory bound
        assert not re.search(r"(ld|st)\.global\.b16", p)


@pytest.mark.gpu
def test_row_slices_cover_each_chunk_once():
    pytest.importorskip("triton")
    from tdcompile.kernels.gemm_all_reduce_ce import row_slices
    for lo, hi, W in [(0, 512, 2), (512, 1000, 4), (0, 3, 4), (128, 133, 8)]:
        s = row_slices(lo, hi, W)
        assert s[0][0] == lo and s[-1][1] == hi and len(s) == W
        assert all(a[1] == b[0] for a, b in zip(s, s[1:])) and all(x1 >= x0 for x0, x1 in s)


@pytest.mark.gpu
def test_unsupported_shapes_are_named():
    pytest.importorskip("triton")
    from types import SimpleNamespace
    from tdcompile.kernels.gemm_all_reduce_ce import unsupported_reason
    ws, bf = SimpleNamespace(max_m=4096), torch.bfloat16
    a, b, bounds = torch.empty(512, 64, dtype=bf), torch.empty(64, 1024, dtype=bf), [(0, 256), (256, 512)]
    assert unsupported_reason(ws, a, b, bounds) is None
    assert "multiple of 8" in unsupported_reason(ws, a, torch.empty(64, 1001, dtype=bf), bounds)
    assert "max M" in unsupported_reason(ws, torch.empty(8192, 64, dtype=bf), b, bounds)
    assert "dtypes" in unsupported_reason(ws, a.float(), b, bounds)
    assert "chunks" in unsupported_reason(ws, a, b, [])


# ------------------------------------------------------------------------------ simulated ranks
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("W", [2, 4])
def test_back_to_back_calls_match_the_rank_order_sum(W, dtype):
    """Several calls in flight (no host sync between them), M not a multiple of W or of the
    chunk, 2 and 4 chunks, with and without bias; every rank gets the same bits."""
    sim = world(W)
    rnd = random.Random(W)
    K, N = 256, 1000
    b = (torch.randn(N, K, device="cuda") * 0.05).to(dtype).t()                      # [K, N]
    bias = (torch.randn(N, device="cuda") * 0.1).to(dtype)
    for use_bias in (None, bias):
        Ms = [rnd.choice([512, 777, 1024, 1500, 2048]) for _ in range(5)]
        Cs = [rnd.choice([c for c in (2, 4) if chunked(M, c)]) for M in Ms]     # chunks of >= 256 rows
        bounds = [chunked(M, C) for M, C in zip(Ms, Cs)]
        as_ = [[torch.randn(M, K, device="cuda").to(dtype) * (r + 1) for M in Ms] for r in range(W)]
        # references first: they run every chunk GEMM, so cuBLAS has loaded its kernels before
        # any simulated rank spins (a module load then could stall the host that launches the peer)
        refs = [reference([as_[r][i] for r in range(W)], b, use_bias, bd, dtype) for i, bd in enumerate(bounds)]
        warm_streams(sim, dtype)
        got = sim.run(lambda ws, al: _calls(ws, al, b, use_bias, bounds), [(as_[r],) for r in range(W)])
        sim.check()
        for i, (M, ref) in enumerate(zip(Ms, refs)):
            for r in range(W):
                assert torch.equal(got[r][i], ref), (i, M, Cs[i], r, (got[r][i].float() - ref.float()).abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_a_given_output_and_an_sm_carveout_give_the_same_sums(W):
    """``out=`` is written and returned (what an op-graph replay needs); ``sm_carveout`` runs the
    chunk GEMMs on fewer SMs through cuBLASLt, whose kernels may round differently from the
    reference's: equal within bf16 rounding, and the same bits on every rank."""
    from tdcompile.kernels.gemm_all_reduce_ce import gemm_all_reduce_ce
    sim = world(W)
    dtype, K, N, M = torch.bfloat16, 256, 1000, 1500
    b = (torch.randn(N, K, device="cuda") * 0.05).to(dtype).t()                      # [K, N]
    bounds = chunked(M, 2)
    as_ = [torch.randn(M, K, device="cuda").to(dtype) * (r + 1) for r in range(W)]
    outs = [torch.full((M, N), float("nan"), device="cuda", dtype=dtype) for _ in range(W)]
    ref = reference(as_, b, None, bounds, dtype).float()
    warm_streams(sim, dtype)
    for carve in (0, 8):
        got = sim.run(lambda ws, a, o: gemm_all_reduce_ce(ws, a, b, None, bounds, out=o, sm_carveout=carve),
                      [(as_[r], outs[r]) for r in range(W)])
        sim.check()
        assert all(got[r] is outs[r] for r in range(W))
        assert all(torch.equal(outs[r], outs[0]) for r in range(W)), carve
        err = ((outs[0].float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (carve, err)
        assert torch._C._get_sm_carveout_experimental() is None                     # restored


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays(W):
    sim = world(W)
    dtype, K, N, M = torch.bfloat16, 128, 512, 1024
    b = (torch.randn(N, K, device="cuda") * 0.05).to(dtype).t()
    bounds = chunked(M, 4)
    as_ = [torch.randn(M, K, device="cuda").to(dtype) * (r + 1) for r in range(W)]
    outs = [None] * W

    def body():
        got = sim.run(lambda ws, a: _calls(ws, [a, a], b, None, [bounds, bounds]), [(as_[r],) for r in range(W)])
        for r in range(W):
            outs[r] = got[r][1]

    ref = reference(as_, b, None, bounds, dtype)          # also loads the chunk GEMMs' cuBLAS kernels
    warm_streams(sim, dtype)
    g = capture_and_replay(sim, body, outs)
    assert all(torch.equal(o, ref) for o in outs)
    for r in range(W):                                   # new inputs, same buffers
        as_[r].copy_(torch.randn(M, K, device="cuda").to(dtype))
    g.replay()
    sim.check()
    ref = reference(as_, b, None, bounds, dtype)
    assert all(torch.equal(o, ref) for o in outs)


@pytest.mark.gpu
def test_peer_never_arrives():
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(2, timeout_s=0.2)
    a = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    sim.run(lambda ws: _calls(ws, [a], b, None, [chunked(512, 2)]), [()], ranks=[0])    # rank 1 never calls
    with pytest.raises(RuntimeError, match=r"gemm_all_reduce: rank 0 timed out"):
        sim.check()
