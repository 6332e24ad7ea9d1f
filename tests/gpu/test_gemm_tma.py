"""The TMA GEMM (tdcompile/kernels/gemm_tma.py) and the all-gather + GEMM built on it
(tdcompile/kernels/all_gather_gemm_tma.py).

``gpu``: one GPU.  The GEMM alone matches cuBLAS under every candidate config, for shapes that
are not multiples of any tile and for both layouts of B (the transposed view of an nn.Linear
weight, a row-major [K, N]).  The all-gather + GEMM, with simulated ranks: the gathered A bit for
bit, every rank's outputs bit-identical to every other rank's and close to cuBLAS, back-to-back
calls interleaved with the ``ce`` variant, CUDA-graph replays, a peer that never arrives, and the
shapes it must refuse.  The PTX tests compile offline (no GPU needed:
``pytest --noconftest -m gpu -k ptx tests/gpu/test_gemm_tma.py``)."""
import pytest
import torch
from sim_ranks import capture_and_replay, world  # noqa: E402  (tests/gpu helper)


def _weight(N, K, dtype, seed, layout="linear"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn((N, K), device="cuda", generator=g) * 0.05).to(dtype)       # [N, K]
    return w.t() if layout == "linear" else w.t().contiguous()                    # [K, N]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["linear", "kn"])
def test_every_config_matches_cublas_on_ragged_shapes(layout):
    from tdcompile.kernels.gemm_tma import tma_configs, tma_gemm
    g = torch.Generator(device="cuda").manual_seed(0)
    for M, N, K in [(1, 8, 8), (77, 136, 200), (130, 264, 136), (300, 520, 1032), (1000, 384, 512)]:
        a = torch.randn((M, K), device="cuda", generator=g).to(torch.bfloat16)
        b = _weight(N, K, torch.bfloat16, M, layout)
        want = (a.float() @ b.float())
        for cfg in tma_configs():
            got = tma_gemm(a, b, cfg=cfg)
            err = ((got.float() - want).norm() / want.norm()).item()
            assert err < 1e-2, (M, N, K, cfg.name(), err)


@pytest.mark.gpu
def test_fp16_and_a_preallocated_output():
    from tdcompile.kernels.gemm_tma import tma_gemm
    a = torch.randn((256, 320), device="cuda").half()
    b = _weight(192, 320, torch.float16, 1)
    out = torch.full((256, 192), float("nan"), device="cuda", dtype=torch.float16)
    assert tma_gemm(a, b, out=out) is out
    torch.testing.assert_close(out.float(), a.float() @ b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1000, 96])
def test_accumulate_adds_into_out_like_addmm(M):
    """``accumulate``: out += a @ b, as the chain GEMM + all-reduce's ``addmm_`` (beta = 1)."""
    from tdcompile.kernels.gemm_tma import pick_tma_config, tma_gemm
    a = torch.randn((M, 640), device="cuda").bfloat16()
    b = _weight(5120, 640, torch.bfloat16, 2)
    c0 = torch.randn((M, 5120), device="cuda").bfloat16()
    out = c0.clone()
    tma_gemm(a, b, out=out, accumulate=True)
    want = c0.float() + a.float() @ b.float()
    assert ((out.float() - want).norm() / want.norm()).item() < 1e-2, pick_tma_config(M, 5120, 640).name()
    with pytest.raises(ValueError, match="accumulate needs out"):
        tma_gemm(a, b, accumulate=True)


@pytest.mark.gpu
def test_refuses_what_tma_cannot_read():
    from tdcompile.kernels.gemm_tma import tma_gemm, unsupported_reason
    a = torch.randn((64, 100), device="cuda").bfloat16()
    assert unsupported_reason(a.float(), _weight(64, 100, torch.float32, 0)) is not None    # fp32
    assert "16-byte" in unsupported_reason(torch.randn((64, 12), device="cuda").bfloat16()[:, 1:9],
                                           _weight(64, 8, torch.bfloat16, 0))              # misaligned A
    a128 = torch.randn((64, 128), device="cuda").bfloat16()
    assert "N * element size" in unsupported_reason(a128, _weight(12, 128, torch.bfloat16, 0))
    with pytest.raises(ValueError, match="tma_gemm"):
        tma_gemm(a.float(), _weight(64, 100, torch.float32, 0))


def _shards(W, m, K, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [((torch.randn((m, K), device="cuda", generator=g) * (r + 1)) + 0.01 * r).bfloat16() for r in range(W)]


def _check(got, shards, bs, ret):
    A = torch.cat(shards)
    first = got[0]
    for r, (a_out, c_outs) in enumerate(got):
        assert (torch.equal(a_out, A) if ret else a_out.numel() == 0), r
        for c, c0, b in zip(c_outs, first[1], bs):
            assert torch.equal(c, c0), f"rank {r} differs from rank 0"
            want = A.float() @ b.float()
            assert ((c.float() - want).norm() / want.norm()).item() < 1e-2, r


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_all_gather_gemm_tma_back_to_back_and_interleaved_with_ce(W):
    from tdcompile.kernels.all_gather_gemm_ce import all_gather_gemm_ce
    from tdcompile.kernels.all_gather_gemm_tma import all_gather_gemm_tma
    sim = world(W, "ag_tma")
    cases = [(_shards(W, m, K, i), [_weight(N, K, torch.bfloat16, 10 * i + j, ("linear", "kn")[j % 2])
                                    for j, N in enumerate(Ns)], bool(i % 2))
             for i, (m, K, Ns) in enumerate([(128, 256, [256]), (256, 512, [384, 128]), (128, 320, [136, 64, 520]),
                                             (64 if W == 2 else 128, 256, [512])])]
    for shards, bs, ret in cases:                       # first calls: compile / warm every shape
        for fn in (all_gather_gemm_tma, all_gather_gemm_ce):
            sim.run(lambda ws, s, bs=bs, ret=ret, fn=fn: fn(ws, s, bs, ret), [(shards[r],) for r in range(W)])
        sim.check()

    def all_calls(ws, rank):
        got = []
        for k in range(2):
            for shards, bs, ret in cases:
                fn = all_gather_gemm_tma if k == 0 else all_gather_gemm_ce
                got.append((yield from fn(ws, shards[rank], bs, ret)))
        return got

    got = sim.run(all_calls, [(r,) for r in range(W)])
    sim.check()
    for i, (shards, bs, ret) in enumerate(cases):
        _check([got[r][i] for r in range(W)], shards, bs, ret)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_all_gather_gemm_tma_cuda_graph_replays(W):
    from tdcompile.kernels.all_gather_gemm_tma import all_gather_gemm_tma
    sim = world(W, "ag_tma")
    shards, bs = _shards(W, 128, 512, 3), [_weight(256, 512, torch.bfloat16, 4), _weight(128, 512, torch.bfloat16, 5)]
    res = [None] * W

    def body():     # two calls per replay: the epoch moves from call to call
        for _ in range(2):
            got = sim.run(lambda ws, s: all_gather_gemm_tma(ws, s, bs, True), [(shards[r],) for r in range(W)])
        for r in range(W):
            res[r] = got[r]

    body()
    capture_and_replay(sim, body, [o for r in range(W) for o in (res[r][0], *res[r][1])], times=10)
    _check(res, shards, bs, True)


@pytest.mark.gpu
def test_all_gather_gemm_tma_refuses_shards_that_are_not_whole_tiles():
    from tdcompile.kernels.all_gather_gemm_tma import unsupported_reason
    ws = world(2, "ag_tma").ws[0]
    assert unsupported_reason(ws, torch.empty((100, 256), device="cuda", dtype=torch.bfloat16),
                              [_weight(256, 256, torch.bfloat16, 0)]).startswith("TMA GEMM: shard rows 100")
    assert unsupported_reason(ws, torch.empty((128, 256), device="cuda", dtype=torch.bfloat16),
                              [_weight(256, 256, torch.bfloat16, 0)]) is None


@pytest.mark.gpu
def test_all_gather_gemm_tma_peer_never_arrives():
    from tdcompile.kernels.all_gather_gemm_tma import all_gather_gemm_tma
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(2, timeout_s=0.2)
    shards, bs = _shards(2, 64, 64, 1), [_weight(64, 64, torch.bfloat16, 2)]
    sim.run(lambda ws: all_gather_gemm_tma(ws, shards[0], bs), [()], ranks=[0])
    with pytest.raises(RuntimeError, match=r"all_gather_gemm.*rank 0"):
        sim.check()


@pytest.mark.gpu
def test_ptx_uses_tma_and_wgmma_and_fences_after_the_flag():
    """TMA box loads (``cp.async.bulk.tensor``) and ``wgmma``, no per-thread global loads of A/B;
    with WORLD > 1 the flag's acquire is followed by the async-proxy fence."""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tdcompile.kernels.gemm_tma import _tma_gemm_kernel, pick_tma_config
    cfg = pick_tma_config(4096, 12800, 5120)
    BM, BN, BK = cfg.BLOCK_SIZE_M, cfg.BLOCK_SIZE_N, cfg.BLOCK_SIZE_K
    sig = {"a_desc": f"tensordesc<bf16[{BM}, {BK}]>", "b_desc": f"tensordesc<bf16[{BN}, {BK}]>",
           "c_desc": f"tensordesc<bf16[{BM}, {BN // 2}]>", "progress_ptr": "*i32", "m_seg": "i32", "N": "i32",
           "K": "i32", "err_addr": "i64", "err_code": "i32", "rank": "i32", "timeout_us": "i32"}
    const = {"WORLD": 2, "B_KN": False, "BLOCK_SIZE_M": BM, "BLOCK_SIZE_N": BN, "BLOCK_SIZE_K": BK,
             "GROUP_SIZE_M": 8, "EPILOGUE_SUBTILE": True, "FLATTEN": True}
    src = ASTSource(fn=_tma_gemm_kernel, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    p = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}).asm["ptx"]
    assert "cp.async.bulk.tensor" in p
    assert "wgmma.mma_async" in p
    acq, fence = p.find("ld.acquire.sys.global"), p.find("fence.proxy.async.global")
    assert 0 <= acq < fence, "the async-proxy fence must follow the flag's acquire"
    assert not re.search(r"ld\.global(\.\w+)*\.v4\.b32", p), "A/B must come by TMA, not per-thread loads"


# ------------------------------------------------------------------------------ real processes
def _real_worker(rank, world_size, port, q):
    from real_ranks import compiled_together, failure, init_rank
    dist = init_rank(rank, world_size, port, TDCOMPILE_SPIN_TIMEOUT_S="10")
    done = []
    try:
        from tdcompile.kernels.all_gather_gemm_tma import all_gather_gemm_tma
        from tdcompile.kernels.symm import get_workspace
        ws = get_workspace(dist.group.WORLD.group_name)
        cases = [(128, 256, [256]), (256, 512, [384, 128]), (128, 320, [136, 64, 520]), (1024, 5120, [2560, 512]),
                 (64 if world_size == 2 else 128, 256, [512])]
        for i, (m, K, Ns) in enumerate(cases):        # one call at a time: the failing one is named
            shard = _shards(world_size, m, K, 100 + i)[rank]
            bs = [_weight(N, K, torch.bfloat16, 10 * i + j, ("linear", "kn")[j % 2]) for j, N in enumerate(Ns)]
            a_out, outs = compiled_together(ws, dist, lambda: all_gather_gemm_tma(ws, shard, bs, True))
            ws.check(sync=True)
            A = torch.empty((world_size * m, K), device="cuda", dtype=torch.bfloat16)
            dist.all_gather_into_tensor(A, shard)
            assert torch.equal(a_out, A), i
            for c, b in zip(outs, bs):
                want = A.float() @ b.float()
                assert ((c.float() - want).norm() / want.norm()).item() < 1e-2, i
                c0 = c.clone()
                dist.broadcast(c0, 0)
                assert torch.equal(c, c0), f"call {i}: rank {rank} differs from rank 0"
            done.append(i)
        shard = _shards(world_size, 256, 512, 7)[rank]
        bs = [_weight(384, 512, torch.bfloat16, 8)]
        first = all_gather_gemm_tma(ws, shard, bs)[1][0].clone()
        for _ in range(30):                           # back to back, no host sync
            out = all_gather_gemm_tma(ws, shard, bs)[1][0]
        ws.check(sync=True)
        assert torch.equal(out, first)
        q.put((rank, "ok"))
    except BaseException as e:  # noqa: BLE001
        q.put((rank, f"after calls {done[-3:]}: {failure(e)}"))
        raise


@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_all_gather_gemm_tma_real_processes(world_size):
    """Real ranks: changing shapes and weight counts (A bit for bit, outputs close to cuBLAS and
    the same bits on every rank), then 30 calls back to back with the same result."""
    from real_ranks import expect_all_ok
    expect_all_ok(_real_worker, world_size, timeout=300)
