"""all_reduce / all_reduce_rmsnorm kernels (tdcompile/kernels/all_reduce*.py).

``gpu``: one GPU, simulated ranks (SimWorld: one buffer set + stream per rank, kernels
co-resident), plus an offline PTX check (128-bit accesses).  ``multigpu``: real processes on
>= 2 GPUs, against NCCL.

Exactness: both variants sum in fp32 in rank order 0..W-1 and cast once, so the all-reduce is
compared *bit for bit* with ``(x0.float() + x1.float() + ...).to(dtype)``; the residual add
too; the RMSNorm output within a few bf16/fp16 ulps (reduction order of the mean, rsqrt)."""
import os
import random

import pytest
import torch
from sim_ranks import poison, world  # noqa: E402  (tests/gpu helper)

os.environ.setdefault("TDCOMPILE_MAX_M", "4096")
VARIANTS = ["one_shot", "two_shot"]
N_CASES = int(os.environ.get("TDCOMPILE_TEST_CASES", "12"))
EPS = 1e-6


def rank_input(shape, r, dtype, scale=1.0):
    x = torch.randn(shape, device="cuda", dtype=torch.float32) * scale
    return (x * (r + 1) + 0.01 * (r + 1)).to(dtype)


def ref_sum(xs, dtype):
    acc = xs[0].float()
    for x in xs[1:]:
        acc = acc + x.float()
    return acc.to(dtype)


def ref_rmsnorm(ar, residual, weight, eps):
    """HF Qwen3: residual add in dtype; RMSNorm in fp32, cast, then scale in dtype."""
    nr = residual + ar
    h = nr.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(nr.dtype), nr


def assert_norm_close(y, ref):
    assert torch.isfinite(y).all(), "non-finite values (poisoned output not overwritten?)"
    tol = 1.6e-2 if y.dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)




def sizes(seed, n=N_CASES):
    rnd = random.Random(seed)
    fixed = [(1, 5120), (3, 5120), (128, 5120), (77, 1000), (1, 8), (513, 333), (1, 1), (1000, 5120), (5, 7)]
    return fixed + [(rnd.randint(1, 700), rnd.choice([64, 100, 512, 5120, 7, 1032])) for _ in range(n)]


# ------------------------------------------------------------------------------ PTX (offline compile)
@pytest.mark.gpu
def test_ptx_128bit_peer_loads():
    """Compile every kernel for sm_90 offline and check the peer loads/stores are 128-bit."""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tdcompile.kernels import all_reduce as ar
    from tdcompile.kernels import all_reduce_rmsnorm as rm

    def ptx(fn, sig, const, nw):
        attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v.startswith("*")}
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw}).asm["ptx"]

    common = {"buf_tab": "*i64", "sig_tab": "*i64", "my_sig": "*i32", "cnt_ptr": "*i32", "err_addr": "i64",
              "err_base": "i32", "rank": "i32", "timeout_us": "i32"}
    head = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
            "M": "i32", "eps": "fp32"}
    for W in (2, 4, 8):
        for copy in (False, True):
            srcs = [
                ptx(ar._one_shot_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16", "n_arg": "i32", **common},
                    {"WORLD": W, "COPY_IN": copy, "EVEN": True, "BLOCK": 8192 if W <= 4 else 4096}, 16),
                ptx(ar._two_shot_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16", "n_arg": "i32", "res8": "i32", **common},
                    {"WORLD": W, "COPY_IN": copy, "EVEN": True, "SUB": 4096}, 16),
                ptx(rm._ar_rms_one_shot, {**head, **common},
                    {"WORLD": W, "COPY_IN": copy, "N": 5120, "BLOCK_N": 8192}, 8),
            ]
            if W < 8:   # W=8 two-shot RMSNorm slices are 640 wide: 64-bit by layout, not alignment
                sw = (triton.cdiv(5120, W) + 7) // 8 * 8
                srcs.append(ptx(rm._ar_rms_two_shot, {**head, "res8": "i32", **common},
                                {"WORLD": W, "COPY_IN": copy, "N": 5120, "BLOCK_N": 8192, "SW": sw,
                                 "BLOCK_S": triton.next_power_of_2(sw)}, 8))
            for p in srcs:
                acc = [ln.strip() for ln in p.splitlines() if re.search(r"\b(ld|st)\.global", ln)]
                peer = [ln for ln in acc if ".cg." in ln]
                assert peer and all(".v4.b32" in ln for ln in peer), [ln for ln in peer if ".v4." not in ln][:4]
                assert not any(re.search(r"\.(b16|u16|s16)\b", ln) for ln in acc), "16-bit global accesses"
                assert "st.release.sys.global.u32" in p and "ld.acquire.sys.global.u32" in p
                assert "fence.acq_rel.sys" not in p


# ------------------------------------------------------------------------------ all_reduce (simulated)
@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("W", [2, 4])
def test_all_reduce_exact(W, dtype, variant):
    from tdcompile.kernels.all_reduce import all_reduce
    sim = world(W)
    rnd = random.Random(W * 7 + len(variant))
    for i, (m, n) in enumerate(sizes(W + (dtype == torch.float16))):
        xs = [rank_input((m, n), r, dtype) for r in range(W)]
        ref = ref_sum(xs, dtype)
        outs = [poison(torch.empty_like(xs[0])) for _ in range(W)]
        ctas = rnd.choice([None, 1, 3, 8, 64])
        sim.run(lambda ws, x, o: all_reduce(ws, x, out=o, variant=variant, ctas=ctas),
                [(xs[r], outs[r]) for r in range(W)])
        sim.check()
        for r in range(W):
            assert torch.equal(outs[r], ref), (m, n, r, ctas, (outs[r].float() - ref.float()).abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_all_reduce_default_entry_and_auto(W):
    """The compatible ``all_reduce(ws, x)`` entry (auto variant, default grid)."""
    from tdcompile.kernels.all_reduce import all_reduce
    sim = world(W)
    for (m, n) in [(128, 5120), (2048, 5120), (3, 7)]:
        xs = [rank_input((m, n), r, torch.bfloat16) for r in range(W)]
        outs = sim.run(lambda ws, x: all_reduce(ws, x), [(xs[r],) for r in range(W)])
        sim.check()
        for o in outs:
            assert torch.equal(o, ref_sum(xs, torch.bfloat16))


def _mm_ar_loop(ws, a_list, b, variant, op, extra=None):
    """Per-rank generator: K back-to-back (mm -> symm_input) -> all-reduce calls on this
    rank's stream, no host sync: ranks race each other exactly as real processes do."""
    from tdcompile.kernels.all_reduce import all_reduce, symm_input
    from tdcompile.kernels.all_reduce_rmsnorm import all_reduce_rmsnorm
    outs = []
    for i, a in enumerate(a_list):
        view = symm_input(ws, (a.shape[0], b.shape[1]), a.dtype)
        torch.mm(a, b, out=view)
        v = variant[i % len(variant)] if isinstance(variant, (list, tuple)) else variant
        if op == "all_reduce":
            out = yield from all_reduce(ws, view, variant=v)
        else:
            res, w = extra
            out = yield from all_reduce_rmsnorm(ws, view, res, w, EPS, variant=v)
        outs.append(out)
    return outs


def _mm_inputs(W, K, M, N, Kd, dtype=torch.bfloat16):
    a = [[rank_input((M, Kd), r, dtype, 0.1) for _ in range(K)] for r in range(W)]
    b = [rank_input((Kd, N), r, dtype, 0.1) for r in range(W)]
    return a, b


def _mm_expect(a, b, W, i, dtype):
    return ref_sum([a[r][i] @ b[r] for r in range(W)], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS + ["mixed"])
@pytest.mark.parametrize("W", [2, 4])
def test_zero_copy_back_to_back(W, variant):
    """GEMM writes straight into the symmetric buffer; 24 calls in flight with no sync."""
    sim = world(W)
    K, M, N, Kd = 24, 129, 5120, 256
    a, b = _mm_inputs(W, K, M, N, Kd)
    v = VARIANTS if variant == "mixed" else variant
    outs = sim.run(lambda ws, al, bb: _mm_ar_loop(ws, al, bb, v, "all_reduce"), [(a[r], b[r]) for r in range(W)])
    sim.check()
    for i in range(K):
        exp = _mm_expect(a, b, W, i, torch.bfloat16)
        for r in range(W):
            assert torch.equal(outs[r][i], exp), (i, r)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays(W, variant):
    """mm -> symm_input -> all_reduce (zero copy) and a copy-in all_reduce, captured in one
    graph (odd number of calls), replayed back to back; then new input values."""
    from tdcompile.kernels.all_reduce import all_reduce
    sim = world(W)
    K, M, N, Kd = 3, 64, 1024, 128
    a, b = _mm_inputs(W, K, M, N, Kd)
    xs = [rank_input((100, 5120), r, torch.bfloat16) for r in range(W)]

    def body():
        o1 = sim.run(lambda ws, al, bb: _mm_ar_loop(ws, al, bb, variant, "all_reduce"), [(a[r], b[r]) for r in range(W)])
        o2 = sim.run(lambda ws, x: all_reduce(ws, x, variant=variant), [(xs[r],) for r in range(W)])
        return o1, o2

    body()                                   # warm-up: regions, compiles
    sim.check()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        o1, o2 = body()
    for _ in range(int(os.environ.get("TDCOMPILE_TEST_REPLAYS", "30"))):
        g.replay()
    sim.check()

    def verify():
        for i in range(K):
            exp = _mm_expect(a, b, W, i, torch.bfloat16)
            for r in range(W):
                assert torch.equal(o1[r][i], exp), (i, r)
        for r in range(W):
            assert torch.equal(o2[r], ref_sum(xs, torch.bfloat16))
    verify()
    for t in [t for al in a for t in al] + xs:
        t.copy_(torch.randn_like(t) * 0.1)
    for r in range(W):
        poison(o2[r])
    for _ in range(3):
        g.replay()
    sim.check()
    verify()


# ------------------------------------------------------------------------------ all_reduce_rmsnorm (simulated)
@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("W", [2, 4])
def test_all_reduce_rmsnorm(W, dtype, variant):
    from tdcompile.kernels.all_reduce_rmsnorm import all_reduce_rmsnorm
    sim = world(W)
    rnd = random.Random(W + 100)
    shapes = [(1, 5120), (128, 5120), (3, 5120), (77, 1000), (5, 7), (200, 4096), (1, 8)] + \
             [(rnd.randint(1, 300), rnd.choice([5120, 1024, 200, 16384])) for _ in range(N_CASES // 2)]
    for (m, n) in shapes:
        xs = [rank_input((m, n), r, dtype) for r in range(W)]
        res = torch.randn((m, n), device="cuda", dtype=torch.float32).to(dtype)
        w = (1 + 0.1 * torch.randn((n,), device="cuda")).to(dtype)
        ref_y, ref_nr = ref_rmsnorm(ref_sum(xs, dtype), res, w, EPS)
        outs = [(poison(torch.empty_like(res)), poison(torch.empty_like(res))) for _ in range(W)]
        ctas = rnd.choice([None, 1, 7, 32])
        sim.run(lambda ws, x, o, ro: all_reduce_rmsnorm(ws, x, res, w, EPS, variant=variant, out=o,
                                                         residual_out=ro, ctas=ctas),
                [(xs[r], outs[r][0], outs[r][1]) for r in range(W)])
        sim.check()
        for r in range(W):
            y, nr = outs[r]
            assert torch.equal(nr, ref_nr), (m, n, r)
            assert_norm_close(y, ref_y)
            assert torch.equal(y, outs[0][0]), "ranks disagree"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS + ["mixed"])
@pytest.mark.parametrize("W", [2, 4])
def test_rmsnorm_zero_copy_back_to_back_and_graph(W, variant):
    sim = world(W)
    K, M, N, Kd = 9, 128, 5120, 256
    a, b = _mm_inputs(W, K, M, N, Kd)
    res = torch.randn((M, N), device="cuda").to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn((N,), device="cuda")).to(torch.bfloat16)
    v = VARIANTS if variant == "mixed" else variant

    def run():
        return sim.run(lambda ws, al, bb: _mm_ar_loop(ws, al, bb, v, "rmsnorm", (res, w)),
                       [(a[r], b[r]) for r in range(W)])

    def verify(outs):
        for i in range(K):
            ref_y, ref_nr = ref_rmsnorm(_mm_expect(a, b, W, i, torch.bfloat16), res, w, EPS)
            for r in range(W):
                y, nr = outs[r][i]
                assert torch.equal(nr, ref_nr), (i, r)
                assert_norm_close(y, ref_y)
    outs = run()
    sim.check()
    verify(outs)
    if W > 2:   # one graph holding 4 simulated ranks' GEMMs and spinning kernels on ONE GPU can starve
        return  # a peer of SMs (seen 2026-11-27, 2xH200); real processes (one GPU per rank) cover W=4
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gouts = run()
    for _ in range(10):
        g.replay()
    sim.check()
    verify(gouts)


# ------------------------------------------------------------------------------ timeouts (simulated)
@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("op", ["all_reduce", "all_reduce_rmsnorm"])
def test_peer_never_arrives(op, variant):
    from tdcompile.kernels.all_reduce import all_reduce
    from tdcompile.kernels.all_reduce_rmsnorm import all_reduce_rmsnorm
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(2, timeout_s=0.2)
    x = rank_input((64, 512), 0, torch.bfloat16)
    w = torch.ones(512, device="cuda", dtype=torch.bfloat16)
    if op == "all_reduce":
        fn = lambda ws: all_reduce(ws, x, variant=variant)  # noqa: E731
    else:
        fn = lambda ws: all_reduce_rmsnorm(ws, x, x, w, EPS, variant=variant)  # noqa: E731
    sim.run(fn, [()], ranks=[0])                            # rank 1 never calls
    with pytest.raises(RuntimeError, match=rf"{op}: rank 0"):
        sim.check()
    with pytest.raises(RuntimeError, match="rank 0"):         # stays raised
        sim.ws[0].check()


# ------------------------------------------------------------------------------ real processes


def _worker(rank, world_size, port, q):
    from real_ranks import init_rank
    dist = init_rank(rank, world_size, port, TDCOMPILE_SPIN_TIMEOUT_S="60", TDCOMPILE_MAX_M="4096")
    try:
        from tdcompile.kernels.all_reduce import all_reduce, symm_input
        from tdcompile.kernels.all_reduce_rmsnorm import all_reduce_rmsnorm
        from tdcompile.kernels.symm import get_workspace
        W = world_size
        ws = get_workspace(dist.group.WORLD.group_name)
        torch.manual_seed(1000 + rank)

        def nccl(x):
            y = x.clone()
            dist.all_reduce(y)
            return y

        def same_on_all_ranks(t):
            h = torch.tensor([float(t.float().sum()), float((t.float() * torch.arange(t.numel(), device="cuda")
                                                            .view(t.shape).remainder(97)).sum())], device="cuda",
                             dtype=torch.float64)
            g = [torch.empty_like(h) for _ in range(W)]
            dist.all_gather(g, h)
            return all(torch.equal(g[0], x) for x in g)

        rnd = random.Random(5)
        for case in range(30):
            m, n = rnd.choice([1, 3, 128, 129, 1000, 2048]), rnd.choice([5120, 512, 1000, 7])
            variant = VARIANTS[case % 2]
            x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * (rank + 1)
            out = all_reduce(ws, x, variant=variant, ctas=rnd.choice([None, 8, 32, 128]))
            ws.check(sync=True)
            ref = nccl(x)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < 1e-2, (case, m, n, variant, err)
            assert same_on_all_ranks(out), ("ranks disagree", case)
        # zero copy, back to back, both variants, both ops
        b = torch.randn(256, 5120, device="cuda", dtype=torch.bfloat16) * 0.05
        res = torch.randn(128, 5120, device="cuda", dtype=torch.bfloat16)
        w = (1 + 0.1 * torch.randn(5120, device="cuda")).to(torch.bfloat16)
        a_s = [torch.randn(128, 256, device="cuda", dtype=torch.bfloat16) for _ in range(8)]

        def step(a, i):
            view = symm_input(ws, (128, 5120), torch.bfloat16)
            torch.mm(a, b, out=view)
            if i % 2:
                return all_reduce(ws, view, variant=VARIANTS[(i // 2) % 2])
            return all_reduce_rmsnorm(ws, view, res, w, EPS, variant=VARIANTS[(i // 2) % 2])[0]

        def refs():
            out = []
            for i, a in enumerate(a_s):
                s = nccl(a @ b)
                out.append(s if i % 2 else ref_rmsnorm(s, res, w, EPS)[0])
            return out
        expect = refs()
        for it in range(200):
            got = [step(a, i) for i, a in enumerate(a_s)]
        ws.check(sync=True)
        for o, e in zip(got, expect):
            assert_norm_close(o, e)
        gr = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.cuda.graph(gr, stream=s):
            gouts = [step(a, i) for i, a in enumerate(a_s[:5])]   # odd number of calls
        for _ in range(500):
            gr.replay()
        ws.check(sync=True)
        for o, e in zip(gouts, expect):
            assert_norm_close(o, e)
        for a in a_s:
            a.copy_(torch.randn_like(a))
        expect = refs()
        gr.replay()
        ws.check(sync=True)
        for o, e in zip(gouts, expect):
            assert_norm_close(o, e)
        dist.barrier()
        torch.cuda.synchronize()
        # a peer that never arrives: only rank 0 calls
        if rank == 0:
            ws.timeout_us = 500_000
            all_reduce(ws, x, variant="one_shot")
            try:
                ws.check(sync=True)
                q.put((rank, "no error raised"))
            except RuntimeError as e:
                q.put((rank, "ok" if "all_reduce: rank 0" in str(e) else f"bad message: {e}"))
        else:
            q.put((rank, "ok"))
    except Exception as e:  # noqa: BLE001
        import traceback
        q.put((rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise


@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_real_processes(world_size):
    from real_ranks import expect_all_ok
    expect_all_ok(_worker, world_size, timeout=600)
