"""GEMM + reduce-scatter on one persistent TMA GEMM, partials pushed by the copy engine as each
destination's tiles complete: tdcompile/kernels/gemm_reduce_scatter_tma.py.

``gpu``: one GPU, simulated ranks.  The TMA GEMM's tiles are not cuBLAS's bits, so every rank's
result is compared with the fp32 rank-order sum of the partials within bf16 tolerance, and the
same call repeated must give the same bits.  Rows that are no multiple of the tile (tiles masked
at a destination's edge), back-to-back calls of changing shape interleaved with the ``ce``
variant (same receive slots, barriers and epoch), graph replays, a peer that never arrives, and
what it must refuse.  ``multigpu``: the same checks on real processes at W = 2 and 4.  The PTX
test compiles offline (``pytest --noconftest -m gpu -k ptx``)."""
import pytest
import torch
from sim_ranks import capture_and_replay, world  # noqa: E402  (tests/gpu helper)


def _inputs(W, M, N, K, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = [(torch.randn((M, K), device="cuda", generator=g) * (q + 1)).bfloat16() for q in range(W)]
    w = (torch.randn((N, K), device="cuda", generator=g) * 0.05).bfloat16()       # nn.Linear weight [N, K]
    return a, (w.t() if seed % 2 else w.t().contiguous())                         # [K, N], both layouts


def _close_to_sum(got, a, b, r, W):
    m = a[0].shape[0] // W
    want = sum(x[r * m:(r + 1) * m].float() @ b.float() for x in a)
    err = ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert err < 1e-2, (r, err)


CASES = [(256, 512, 256), (200, 384, 320), (1024, 520, 640), (64, 128, 128), (384, 2048, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_matches_the_sum_back_to_back_interleaved_with_ce(W):
    from tdcompile.kernels.gemm_reduce_scatter_ce import gemm_reduce_scatter_ce
    from tdcompile.kernels.gemm_reduce_scatter_tma import gemm_reduce_scatter_tma
    sim = world(W, "grs_tma")
    cases = [_inputs(W, W * mr, N, K, 30 + i) for i, (mr, N, K) in enumerate(CASES)]
    for a, b in cases:                                  # first calls: compile / warm every shape
        for fn in (gemm_reduce_scatter_tma, gemm_reduce_scatter_ce):
            sim.run(lambda ws, x, b=b, fn=fn: fn(ws, x, b), [(a[r],) for r in range(W)])
        sim.check()

    def all_calls(ws, rank):
        got = []
        for k in range(3):
            for a, b in cases:
                fn = gemm_reduce_scatter_ce if k == 1 else gemm_reduce_scatter_tma
                got.append((yield from fn(ws, a[rank], b)).clone())
        return got

    got = sim.run(all_calls, [(r,) for r in range(W)])
    sim.check()
    n = len(cases)
    for i, (a, b) in enumerate(cases):
        for r in range(W):
            _close_to_sum(got[r][i], a, b, r, W)
            assert torch.equal(got[r][i], got[r][2 * n + i]), (i, r)      # tma twice, around a ce call
            _close_to_sum(got[r][n + i], a, b, r, W)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays(W):
    from tdcompile.kernels.gemm_reduce_scatter_tma import gemm_reduce_scatter_tma
    sim = world(W, "grs_tma")
    a, b = _inputs(W, W * 256, 512, 256, 3)
    res = [None] * W

    def body():     # two calls per replay: the epoch and the counters move from call to call
        for _ in range(2):
            got = sim.run(lambda ws, x: gemm_reduce_scatter_tma(ws, x, b), [(a[r],) for r in range(W)])
        for r in range(W):
            res[r] = got[r]

    body()
    first = [o.clone() for o in res]
    capture_and_replay(sim, body, res, times=10)
    for r in range(W):
        assert torch.equal(res[r], first[r]), r


@pytest.mark.gpu
def test_refuses_bias_and_rows_not_a_multiple_of_the_world():
    from tdcompile.kernels.gemm_reduce_scatter_tma import unsupported_reason
    ws = world(2, "grs_tma").ws[0]
    b = torch.zeros(64, 64, device="cuda", dtype=torch.bfloat16)
    assert "multiple of the world" in unsupported_reason(ws, torch.zeros(3, 64, device="cuda", dtype=torch.bfloat16),
                                                         b, None)
    assert "bias" in unsupported_reason(ws, torch.zeros(4, 64, device="cuda", dtype=torch.bfloat16), b,
                                        torch.zeros(64, device="cuda", dtype=torch.bfloat16))
    assert unsupported_reason(ws, torch.zeros(4, 64, device="cuda", dtype=torch.bfloat16), b, None) is None


@pytest.mark.gpu
def test_peer_never_arrives():
    from tdcompile.kernels.gemm_reduce_scatter_tma import gemm_reduce_scatter_tma
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(2, timeout_s=0.2)
    a, b = _inputs(2, 128, 64, 64, 1)
    sim.run(lambda ws: gemm_reduce_scatter_tma(ws, a[0], b), [()], ranks=[0])
    with pytest.raises(RuntimeError, match=r"gemm_reduce_scatter.*rank 0"):
        sim.check()


@pytest.mark.gpu
def test_ptx_tma_operands_vector_stores_and_a_release_per_tile():
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tdcompile.kernels.gemm_reduce_scatter_tma import _rs_tma_gemm
    from tdcompile.kernels.gemm_tma import pick_tma_config
    cfg = pick_tma_config(4096, 5120, 12800)
    BM, BN, BK = cfg.BLOCK_SIZE_M, cfg.BLOCK_SIZE_N, cfg.BLOCK_SIZE_K
    sig = {"a_desc": f"tensordesc<bf16[{BM}, {BK}]>", "b_desc": f"tensordesc<bf16[{BN}, {BK}]>", "stage_ptr": "*bf16",
           "own_ptr": "*bf16", "cnt_ptr": "*i32", "m_seg": "i32", "N": "i32", "K": "i32", "rank": "i32"}
    const = {"WORLD": 4, "B_KN": False, "BLOCK_SIZE_M": BM, "BLOCK_SIZE_N": BN, "BLOCK_SIZE_K": BK, "GROUP_SIZE_M": 8,
             "FLATTEN": cfg.FLATTEN}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if sig[name].startswith("*")
               or name in ("m_seg", "N")}                  # as Triton specialises 16-divisible shapes
    src = ASTSource(fn=_rs_tma_gemm, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const,
                    attrs=aligned)
    p = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}).asm["ptx"]
    assert "cp.async.bulk.tensor" in p and "wgmma.mma_async" in p
    stores = re.findall(r"st\.global[\w.]*", p)
    assert stores and all(".v4." in s for s in stores), set(stores)
    fence, atom = p.find("fence.acq_rel.sys"), p.find("atom.global.sys.release.add")
    assert 0 <= fence < atom, "each tile's counter is released after a system-scope fence"


# ------------------------------------------------------------------------------ real processes
def _real_worker(rank, world_size, port, q):
    from real_ranks import compiled_together, failure, init_rank
    dist = init_rank(rank, world_size, port, TDCOMPILE_SPIN_TIMEOUT_S="10")
    done = []
    try:
        from tdcompile.kernels.gemm_reduce_scatter_tma import gemm_reduce_scatter_tma
        from tdcompile.kernels.symm import get_workspace
        ws = get_workspace(dist.group.WORLD.group_name)
        for i, (mr, N, K) in enumerate(CASES + [(1024, 5120, 2560)]):
            a, b = _inputs(world_size, world_size * mr, N, K, 50 + i)
            got = compiled_together(ws, dist, lambda: gemm_reduce_scatter_tma(ws, a[rank], b))
            ws.check(sync=True)
            _close_to_sum(got, a, b, rank, world_size)
            done.append(i)
        a, b = _inputs(world_size, world_size * 256, 512, 256, 9)
        first = gemm_reduce_scatter_tma(ws, a[rank], b).clone()
        for _ in range(30):                           # back to back, no host sync
            out = gemm_reduce_scatter_tma(ws, a[rank], b)
        ws.check(sync=True)
        assert torch.equal(out, first)
        q.put((rank, "ok"))
    except BaseException as e:  # noqa: BLE001
        q.put((rank, f"after calls {done[-3:]}: {failure(e)}"))
        raise


@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_real_processes(world_size):
    from real_ranks import expect_all_ok
    expect_all_ok(_real_worker, world_size, timeout=300)
