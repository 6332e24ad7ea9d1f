"""Lamport (barrier-free) all-reduce: tdcompile/kernels/all_reduce_lamport.py (one-shot) and
all_reduce_lamport2.py (two-shot); the simulated-rank tests run both (``kernel`` parameter).

``gpu``: one GPU, simulated ranks (SimWorld).  The offline PTX compile (sm_90) and the support
checks need only Triton, no GPU, but tests/gpu/conftest.py skips this directory without CUDA;
run them on a CPU machine with ``pytest --noconftest -m gpu -k "ptx or reason" <this file>``.

Exactness: the kernel sums in fp32 in rank order 0..W-1 and casts once; writers turn -0.0 into
+0.0 (-0.0 is the "empty" pattern), so the result equals, bit for bit, the fp32 rank-order sum
of the inputs with -0.0 replaced by +0.0 -- which differs from the plain sum only where every
rank holds -0.0 (+0.0 instead of -0.0, numerically equal)."""
import os
import random

import pytest
import torch
from sim_ranks import poison, world  # noqa: E402  (tests/gpu helper)

N_CASES = int(os.environ.get("TDCOMPILE_TEST_CASES", "24"))


def ref_sum(xs, dtype):
    acc = xs[0].float()
    for x in xs[1:]:
        acc = acc + x.float()
    return acc.to(dtype)


def canon(x):
    """-0.0 -> +0.0 (what the writers do)."""
    return torch.where(x == 0, torch.zeros_like(x), x)


def rank_inputs(shape, W, dtype, seed):
    """Random inputs with exact zeros, -0.0 on some ranks, -0.0 on every rank, cancellations."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    xs = [(torch.randn(shape, device="cuda", generator=g) * (r + 1) + 0.01 * r).to(dtype) for r in range(W)]
    n = xs[0].numel()
    flat = [x.view(-1) for x in xs]
    idx = torch.randint(0, n, (max(1, n // 5), 5), device="cuda", generator=g)
    for r in range(W):
        flat[r][idx[:, 0]] = -0.0                       # -0.0 on every rank
        flat[r][idx[:, 1]] = 0.0                        # +0.0 on every rank
        flat[r][idx[:, 2]] = -0.0 if r % 2 else 0.0     # mixed zeros
    flat[0][idx[:, 3]] = -0.0                           # -0.0 on one rank only
    flat[1][idx[:, 4]] = -flat[0][idx[:, 4]]            # cancellation (exact zero sums for W = 2)
    return xs


def check(out, xs, dtype, what):
    ref = ref_sum([canon(x) for x in xs], dtype)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), \
        (what, (out.float() - ref.float()).abs().max().item())
    plain = ref_sum(xs, dtype)
    assert torch.equal(out, plain), what              # numerically the plain sum (+0.0 == -0.0)


def sizes(seed, n=N_CASES):
    """Shapes that grow and shrink between consecutive calls, odd and even element counts,
    1 element and the full capacity."""
    from tdcompile.kernels.all_reduce_lamport import LAMPORT_MAX_BYTES
    full = LAMPORT_MAX_BYTES // 2
    rnd = random.Random(seed)
    fixed = [(1, 8192), (3, 5120), (1, 1), (full // 1024, 1024), (5, 7), (1, 8), (128, 5120), (1, 9),
             (2, 4096), (77, 1000), (full - 1,), (1, 5120), (513, 333), (8, 1024)]
    return fixed + [(rnd.randint(1, 200), rnd.choice([7, 64, 100, 1032, 4096, 5120, 8192])) for _ in range(n)]


KERNELS = ["lamport", "lamport2"]


def kernel_fn(name):
    """The launcher of the one-shot (``lamport``) or two-shot (``lamport2``) kernel."""
    if name == "lamport":
        from tdcompile.kernels.all_reduce_lamport import all_reduce_lamport
        return all_reduce_lamport
    from tdcompile.kernels.all_reduce_lamport2 import all_reduce_lamport2
    return all_reduce_lamport2


def _loop(ws, xs, outs, ctas, warps=None, kernel="lamport"):
    """Per-rank generator: back-to-back calls on this rank's stream, no host sync; grid and
    chunk size (``num_warps``) may change from call to call (the same on every rank)."""
    fn = kernel_fn(kernel)
    got = []
    for x, o, c, w in zip(xs, outs, ctas, warps or [None] * len(xs)):
        got.append((yield from fn(ws, x, out=o, ctas=c, num_warps=w)))
    return got


# ------------------------------------------------------------------------------ offline (no GPU needed)
@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4, 8])
def test_ptx_128bit_peer_accesses(W):
    """Compile for sm_90 offline: pushes, clears and polls are 128-bit; no barrier, fence or
    atomic; x/out are 128-bit too when the element count is a multiple of 8."""
    pytest.importorskip("triton")
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tdcompile.kernels import all_reduce_lamport as L

    for dt in ("*bf16", "*fp16"):
        for even in (True, False):
            sig = {"x_ptr": dt, "out_ptr": dt, "n_arg": "i32", "n8_arg": "i32", "tab": "*i64", "ctl_ptr": "*i32",
                   "cap8": "i32", "err_addr": "i64", "err_base": "i32", "rank": "i32", "timeout_us": "i32"}
            const = {"WORLD": W, "EVEN": even, "BLOCK": L.BLOCK, "MAXB": L.MAX_CTAS, "DOFF": L.DATA_OFF}
            attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v.startswith("*")}
            src = ASTSource(fn=L._lamport_kernel, signature={**sig, **{k: "constexpr" for k in const}},
                            constexprs=const, attrs=attrs)
            p = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": L.NUM_WARPS}).asm["ptx"]
            acc = [ln.strip() for ln in p.splitlines() if re.search(r"\b(ld|st)(\.volatile)?\.global", ln)]
            polls = [ln for ln in acc if "ld.volatile.global" in ln]
            assert len(polls) >= W and all(".v4.b32" in ln for ln in polls), polls[:4]
            v4st = [ln for ln in acc if ln.lstrip("@%p0123456789 ").startswith("st.global.v4.b32")]
            assert len(v4st) >= 2 * W + even, (dt, even, len(v4st))     # W pushes + W clears (+ out)
            narrow = [ln for ln in acc if re.search(r"\.(b16|u16|s16)\b", ln)]
            if even:
                assert not narrow, narrow[:4]
            else:   # only x loads / out stores may be narrow (unaligned tail), never the peer traffic
                assert all("volatile" not in ln for ln in narrow)
            assert "%globaltimer" in p
            for bad in ("fence.", "atom.", "st.release", "ld.acquire", "bar.red"):
                assert bad not in p, bad


@pytest.mark.gpu
def test_unsupported_reason():
    pytest.importorskip("triton")
    from tdcompile.kernels.all_reduce_lamport import LAMPORT_MAX_BYTES, unsupported_reason
    assert unsupported_reason(None, torch.empty(LAMPORT_MAX_BYTES // 2, dtype=torch.bfloat16)) is None
    assert "LAMPORT_MAX_BYTES" in unsupported_reason(None, torch.empty(LAMPORT_MAX_BYTES // 2 + 1,
                                                                       dtype=torch.float16))
    assert "dtype" in unsupported_reason(None, torch.empty(8, dtype=torch.float32))
    assert unsupported_reason(None, torch.empty(0, dtype=torch.bfloat16))
    assert unsupported_reason(None, torch.tensor(1.0, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------ simulated ranks
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("W", [2, 4])
def test_back_to_back_varying_sizes(W, dtype, kernel):
    """All calls of the list in flight at once (no host sync); sizes shrink and grow (for the
    two-shot kernel, ranks that own no shard included), grids and chunk sizes vary."""
    sim = world(W, kernel)
    rnd = random.Random(W * 31 + (dtype == torch.float16))
    shapes = sizes(W + 10 * (dtype == torch.float16))
    rnd.shuffle(shapes)
    shapes = shapes + shapes[::-1]
    xs = [rank_inputs(s, W, dtype, seed=1000 * W + i) for i, s in enumerate(shapes)]
    outs = [[poison(torch.empty(s, device="cuda", dtype=dtype)) for s in shapes] for _ in range(W)]
    ctas = [rnd.choice([None, None, 1, 3, 8, 64, 128]) for _ in shapes]
    warps = [rnd.choice([None, 4, 8, 16]) for _ in shapes]
    for w in sorted(set(warps), key=str):   # load every variant first: no module load while a peer spins
        x1 = rank_inputs((1, 8), W, dtype, seed=5)
        sim.run(lambda ws, x: _loop(ws, [x], [None], [None], [w], kernel), [(x1[r],) for r in range(W)])
        sim.check()
    sim.run(lambda ws, xl, ol: _loop(ws, xl, ol, ctas, warps, kernel),
            [([x[r] for x in xs], outs[r]) for r in range(W)])
    sim.check()
    for i, s in enumerate(shapes):
        for r in range(W):
            check(outs[r][i], xs[i], dtype, (i, s, r, ctas[i], warps[i]))
    # the same again, one call per sim.run (host between calls), default output
    for i, s in enumerate(shapes[:10]):
        xi = rank_inputs(s, W, dtype, seed=7 + i)
        got = sim.run(lambda ws, x: _loop(ws, [x], [None], [None], kernel=kernel), [(xi[r],) for r in range(W)])
        sim.check()
        for r in range(W):
            check(got[r][0], xi, dtype, ("single", s, r))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("W", [2, 4])
def test_all_negative_zero_gives_positive_zero(W, kernel):
    fn = kernel_fn(kernel)
    sim = world(W, kernel)
    xs = [torch.full((3, 40), -0.0, device="cuda", dtype=torch.bfloat16) for _ in range(W)]
    outs = sim.run(lambda ws, x: fn(ws, x), [(xs[r],) for r in range(W)])
    sim.check()
    for o in outs:
        assert torch.equal(o.view(torch.int16), torch.zeros_like(o).view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays(W, kernel):
    """5 calls of different sizes per replay (not a multiple of 3: the slot rotation shifts
    from replay to replay, driven by the device counters only); same bits every replay."""
    sim = world(W, kernel)
    dtype = torch.bfloat16
    shapes = [(1, 5120), (64, 5120), (3, 7), (1, 8192), (200, 1000)]
    ctas = [None, 8, None, 3, None]
    xs = [rank_inputs(s, W, dtype, seed=50 + i) for i, s in enumerate(shapes)]
    outs = [[torch.empty(s, device="cuda", dtype=dtype) for s in shapes] for _ in range(W)]

    def body():
        sim.run(lambda ws, xl, ol: _loop(ws, xl, ol, ctas, kernel=kernel),
                [([x[r] for x in xs], outs[r]) for r in range(W)])

    body()                                    # warm-up: region, compiles
    sim.check()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()

    def verify(tag):
        for i in range(len(shapes)):
            for r in range(W):
                check(outs[r][i], xs[i], dtype, (tag, i, r))
    for k in range(int(os.environ.get("TDCOMPILE_TEST_REPLAYS", "31"))):
        for o in outs:
            for t in o:
                poison(t)
        g.replay()
        if k % 10 == 0:
            sim.check()
            verify(k)
    sim.check()
    verify("last")
    for i, s in enumerate(shapes):                # new values, same buffers
        fresh = rank_inputs(s, W, dtype, seed=90 + i)
        for r in range(W):
            xs[i][r].copy_(fresh[r])
    for _ in range(4):
        g.replay()
    sim.check()
    verify("new inputs")
    body()                                    # eager calls after replays continue the rotation
    sim.check()
    verify("eager after graph")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
def test_peer_never_arrives(kernel):
    from tdcompile.kernels.symm import SimWorld
    fn = kernel_fn(kernel)
    sim = SimWorld(2, timeout_s=0.2)
    x = rank_inputs((64, 512), 2, torch.bfloat16, seed=3)[0]
    sim.run(lambda ws: fn(ws, x), [()], ranks=[0])                    # rank 1 never calls
    with pytest.raises(RuntimeError, match=r"all_reduce: rank 0 timed out waiting for a peer"):
        sim.check()
    with pytest.raises(RuntimeError, match="rank 0"):                  # stays raised
        sim.ws[0].check()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
def test_unsupported_raises(kernel):
    from tdcompile.kernels.all_reduce_lamport import LAMPORT_MAX_BYTES
    from tdcompile.kernels.symm import _Unsupported
    fn = kernel_fn(kernel)
    sim = world(2, kernel)
    big = torch.zeros(LAMPORT_MAX_BYTES // 2 + 8, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(_Unsupported):
        sim.run(lambda ws: fn(ws, big), [(), ()])
