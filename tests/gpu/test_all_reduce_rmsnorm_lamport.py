"""All-reduce + residual add + RMSNorm on the Lamport protocol:
tdcompile/kernels/all_reduce_rmsnorm_lamport.py.

``gpu``: one GPU, simulated ranks.  The all-reduced value is exact (fp32 rank-order sum of the
inputs, -0.0 read as +0.0), so ``new_residual`` is compared bit for bit with
``residual + sum``; ``normed`` within a few ulps (reduction order of the mean, rsqrt), as in
test_all_reduce_kernels.py.  Calls interleave with plain Lamport all-reduces: both share the
slots and the control entries.  Offline PTX check: ``pytest --noconftest -m gpu -k ptx <file>``."""
import pytest
import torch
from rms_cases import graph_replays, interleaved, peer_never_arrives  # noqa: E402  (tests/gpu helpers)
from sim_ranks import world  # noqa: E402


def _rms(ws, x, residual, weight, eps):
    from tdcompile.kernels.all_reduce_rmsnorm_lamport import all_reduce_rmsnorm_lamport
    return all_reduce_rmsnorm_lamport(ws, x, residual, weight, eps)


def _ar(ws, x):
    from tdcompile.kernels.all_reduce_lamport import all_reduce_lamport
    return all_reduce_lamport(ws, x)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4, 8])
def test_ptx_128bit_and_bounded(W):
    pytest.importorskip("triton")
    import re
    from offline_ptx import global_accesses, ptx
    from tdcompile.kernels import all_reduce_lamport as lam
    from tdcompile.kernels import all_reduce_rmsnorm_lamport as k
    sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
           "M": "i32", "n8_arg": "i32", "eps": "fp32", "tab": "*i64", "ctl_ptr": "*i32", "cap8": "i32",
           "err_addr": "i64", "err_base": "i32", "rank": "i32", "timeout_us": "i32"}
    const = {"WORLD": W, "N": 5120, "BLOCK_N": 8192, "MAXB": lam.MAX_CTAS, "DOFF": lam.DATA_OFF,
             "CLEAR_BLOCK": k.CLEAR_BLOCK}
    p = ptx(k._ar_rms_lamport, sig, const, k.num_warps(W, 8192))
    acc = global_accesses(p)
    polls = [ln for ln in acc if "ld.volatile.global" in ln]
    assert len(polls) >= W and all(".v4.b32" in ln for ln in polls)
    assert not [ln for ln in acc if re.search(r"\.(b16|u16|s16)\b", ln)]          # N % 8 == 0: all 128-bit
    assert "%globaltimer" in p
    for bad in ("fence.", "atom.", "bar.red"):
        assert bad not in p, bad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("W", [2, 4])
def test_interleaved_with_plain_lamport_calls(W, dtype):
    interleaved(world(W), W, dtype, _rms, _ar, seed=0, per_rank_residual=False)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays(W):
    graph_replays(world(W), W, _rms)


@pytest.mark.gpu
def test_peer_never_arrives():
    peer_never_arrives(_rms)
