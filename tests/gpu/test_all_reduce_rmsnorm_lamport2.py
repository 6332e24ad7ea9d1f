"""All-reduce + residual add + RMSNorm on the two-shot Lamport protocol:
tdcompile/kernels/all_reduce_rmsnorm_lamport2.py, and the one-kernel add + RMSNorm that stands in
for Inductor's in the ``unfused`` baseline (tdcompile/kernels/add_rmsnorm.py).

``gpu``: one GPU, simulated ranks.  The all-reduced value is exact (fp32 rank-order sum, cast
once by the shard's owner), and so is ``new_residual = residual + sum`` (each rank adds its OWN
residual, in dtype): compared bit for bit.  ``normed`` within a few ulps (reduction order of the
mean), and bit-identical on every rank when the residuals are.  Calls interleave with plain
two-shot Lamport all-reduces, which share the slots and control entries.  Offline PTX check:
``pytest --noconftest -m gpu -k ptx <file>`` on a CPU machine."""
import random
import re

import pytest
import torch
from sim_ranks import poison, world  # noqa: E402  (tests/gpu helper)

EPS = 1e-6


def ref(xs, residual, weight, dtype):
    acc = xs[0].float()
    for x in xs[1:]:
        acc = acc + x.float()
    nr = residual + acc.to(dtype)                                   # HF: residual add in dtype
    h = nr.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * h.to(dtype), nr


def _calls(ws, plan):
    """Per-rank generator: ``plan`` = [("rms", x, res, w) | ("ar", x)], back to back."""
    from tdcompile.kernels.all_reduce_lamport2 import all_reduce_lamport2
    from tdcompile.kernels.all_reduce_rmsnorm_lamport2 import all_reduce_rmsnorm_lamport2
    got = []
    for item in plan:
        if item[0] == "rms":
            got.append((yield from all_reduce_rmsnorm_lamport2(ws, item[1], item[2], item[3], EPS)))
        else:
            got.append((yield from all_reduce_lamport2(ws, item[1])))
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4, 8])
def test_ptx_128bit_and_bounded(W):
    """Offline sm_90: every poll 128-bit, the row and chunk traffic 128-bit at N % 8 == 0, bounded
    waits, and no barrier, fence or atomic."""
    pytest.importorskip("triton")
    from offline_ptx import global_accesses, ptx
    from tdcompile.kernels import all_reduce_lamport as L
    from tdcompile.kernels import all_reduce_lamport2 as L2
    from tdcompile.kernels import all_reduce_rmsnorm_lamport2 as k
    sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
           "M": "i32", "n_arg": "i32", "n8_arg": "i32", "eps": "fp32", "tab": "*i64", "ctl_ptr": "*i32",
           "cap8": "i32", "err_addr": "i64", "err_base": "i32", "rank": "i32", "timeout_us": "i32"}
    nw = k.num_warps(8192)
    const = {"WORLD": W, "EVEN": True, "BLOCK": nw * 256, "N": 5120, "BLOCK_N": 8192, "MAXB": L.MAX_CTAS,
             "DOFF": L.DATA_OFF, "UNIT": L2.UNIT}
    p = ptx(k._ar_rms_lamport2, sig, const, nw)
    acc = global_accesses(p)
    polls = [ln for ln in acc if "ld.volatile.global" in ln]
    assert len(polls) >= W + 1 and all(".v4.b32" in ln for ln in polls), polls[:4]
    assert not [ln for ln in acc if re.search(r"\.(b16|u16|s16)\b", ln)]
    assert "%globaltimer" in p
    for bad in ("fence.", "atom.", "st.release", "ld.acquire", "bar.red"):
        assert bad not in p, bad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("W", [2, 4])
def test_interleaved_with_plain_lamport2_calls(W, dtype):
    """Back-to-back calls of varying shape (rows not a multiple of W or of 8 elements, rows that
    straddle shards) mixed with plain two-shot all-reduces, every rank with its own residual:
    exact ``residual_r + sum``, close norm."""
    sim = world(W, "lamport2")
    rnd = random.Random(3 * W + 11 * (dtype == torch.float16))
    plan_shapes = [("rms", (rnd.choice([1, 3, 128, 77]), rnd.choice([5120, 1000, 64, 4096, 333]))) if rnd.random() < 0.6
                   else ("ar", (rnd.randint(1, 200), rnd.choice([7, 5120]))) for _ in range(24)]
    inputs = []
    for i, (kind, shape) in enumerate(plan_shapes):
        g = torch.Generator(device="cuda").manual_seed(200 + i)
        xs = [(torch.randn(shape, device="cuda", generator=g) * (r + 1)).to(dtype) for r in range(W)]
        if kind == "rms":
            res = [torch.randn(shape, device="cuda", generator=g).to(dtype) for _ in range(W)]
            w = (1 + 0.1 * torch.randn(shape[-1], device="cuda", generator=g)).to(dtype)
            inputs.append((kind, xs, res, w))
        else:
            inputs.append((kind, xs))
    # load every kernel variant first (no module load while a simulated peer spins)
    for item in inputs:
        plan = [("rms", item[1][r], item[2][r], item[3]) if item[0] == "rms" else ("ar", item[1][r]) for r in range(W)]
        sim.run(lambda ws, it: _calls(ws, [it]), [(plan[r],) for r in range(W)])
        sim.check()
    plans = [[("rms", it[1][r], it[2][r], it[3]) if it[0] == "rms" else ("ar", it[1][r]) for it in inputs]
             for r in range(W)]
    got = sim.run(lambda ws, plan: _calls(ws, plan), [(plans[r],) for r in range(W)])
    sim.check()
    for i, it in enumerate(inputs):
        for r in range(W):
            if it[0] == "rms":
                normed, new_res = got[r][i]
                want_n, want_r = ref(it[1], it[2][r], it[3], dtype)
                assert torch.equal(new_res, want_r), (i, r, "residual")
                tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
                torch.testing.assert_close(normed.float(), want_n.float(), rtol=tol, atol=tol)
            else:
                acc = it[1][0].float()
                for x in it[1][1:]:
                    acc = acc + x.float()
                assert torch.equal(got[r][i], acc.to(dtype)), (i, r, "all_reduce")


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays(W):
    sim = world(W, "lamport2")
    dtype, shape = torch.bfloat16, (128, 5120)
    xs = [torch.randn(shape, device="cuda").to(dtype) * (r + 1) for r in range(W)]
    res = torch.randn(shape, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(dtype)
    outs = [None] * W

    def body():     # 2 calls per replay: the slot rotation shifts from replay to replay
        got = sim.run(lambda ws, x: _calls(ws, [("rms", x, res, w), ("rms", x, res, w)]), [(xs[r],) for r in range(W)])
        for r in range(W):
            outs[r] = got[r][1]

    body()
    sim.check()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    want_n, want_r = ref(xs, res, w, dtype)
    for _ in range(10):
        for o in outs:
            poison(o[0])
            poison(o[1])
        g.replay()
    sim.check()
    for n, r in outs:
        assert torch.equal(r, want_r)
        assert torch.equal(n, outs[0][0])                   # equal residuals: the same bits on every rank
        torch.testing.assert_close(n.float(), want_n.float(), rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.gpu
def test_peer_never_arrives():
    from tdcompile.kernels.all_reduce_rmsnorm_lamport2 import all_reduce_rmsnorm_lamport2
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(2, timeout_s=0.2)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(512, device="cuda", dtype=torch.bfloat16)
    sim.run(lambda ws: all_reduce_rmsnorm_lamport2(ws, x, x, w, EPS), [()], ranks=[0])
    with pytest.raises(RuntimeError, match=r"all_reduce_rmsnorm: rank 0 timed out"):
        sim.check()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(128, 5120), (3, 333), (1, 16384)])
def test_add_rmsnorm_stand_in_matches_reference(shape):
    """The ``unfused`` baseline's norm kernel: residual exact, norm within rounding of the
    reference's eager ops (``ops.reference.rmsnorm_after_all_reduce``)."""
    from tdcompile.kernels.add_rmsnorm import add_rmsnorm
    from tdcompile.ops.reference import rmsnorm_after_all_reduce
    g = torch.Generator(device="cuda").manual_seed(5)
    x, res = (torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda", generator=g)).to(torch.bfloat16)
    normed, new_res = add_rmsnorm(x, res, w, EPS)
    want_n, want_r = rmsnorm_after_all_reduce(x, res, w, EPS)
    assert torch.equal(new_res, want_r)
    torch.testing.assert_close(normed.float(), want_n.float(), rtol=1.6e-2, atol=1.6e-2)
