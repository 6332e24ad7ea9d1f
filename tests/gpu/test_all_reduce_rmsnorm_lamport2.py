"""All-reduce + residual add + RMSNorm on the two-shot Lamport protocol:
tdcompile/kernels/all_reduce_rmsnorm_lamport2.py, and the one-kernel add + RMSNorm that stands in
for Inductor's in the ``unfused`` baseline (tdcompile/kernels/add_rmsnorm.py).

``gpu``: one GPU, simulated ranks.  The all-reduced value is exact (fp32 rank-order sum, cast
once by the shard's owner), and so is ``new_residual = residual + sum`` (each rank adds its OWN
residual, in dtype): compared bit for bit.  ``normed`` within a few ulps (reduction order of the
mean), and bit-identical on every rank when the residuals are.  Calls interleave with plain
two-shot Lamport all-reduces, which share the slots and control entries.  Offline PTX check:
``pytest --noconftest -m gpu -k ptx <file>`` on a CPU machine."""
import re

import pytest
import torch
from rms_cases import EPS, graph_replays, interleaved, peer_never_arrives  # noqa: E402  (tests/gpu helpers)
from sim_ranks import world  # noqa: E402


def _rms(ws, x, residual, weight, eps):
    from tdcompile.kernels.all_reduce_rmsnorm_lamport2 import all_reduce_rmsnorm_lamport2
    return all_reduce_rmsnorm_lamport2(ws, x, residual, weight, eps)


def _ar(ws, x):
    from tdcompile.kernels.all_reduce_lamport2 import all_reduce_lamport2
    return all_reduce_lamport2(ws, x)


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
    """Rows that straddle shards too, and every rank with its own residual: each adds its own."""
    interleaved(world(W, "lamport2"), W, dtype, _rms, _ar, seed=100, per_rank_residual=True)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays(W):
    graph_replays(world(W, "lamport2"), W, _rms, same_bits_on_every_rank=True)


@pytest.mark.gpu
def test_peer_never_arrives():
    peer_never_arrives(_rms)


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
