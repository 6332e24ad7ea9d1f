"""Two-shot Lamport all-reduce: tdcompile/kernels/all_reduce_lamport2.py -- what is its own.

Its simulated-rank behaviour (back-to-back calls of varying size, graph replays, -0.0, a missing
peer, oversize input) is tested with the one-shot kernel's, in test_all_reduce_lamport.py
(``kernel`` = ``lamport2``): the same exactness contract, bit-identical to the fp32 rank-order
sum (the owner of a shard casts once, every rank receives its bits).  Here: the offline PTX
(``pytest --noconftest -m gpu -k ptx <this file>`` on a CPU machine), the chunk-size check and
real processes."""
import random
import re

import pytest
import torch
from sim_ranks import world  # noqa: E402  (tests/gpu helper)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4, 8])
def test_ptx_128bit_peer_accesses(W):
    """Offline sm_90: every push, clear and poll is 128-bit; no barrier, fence or atomic."""
    pytest.importorskip("triton")
    from offline_ptx import global_accesses, ptx
    from tdcompile.kernels import all_reduce_lamport as L
    from tdcompile.kernels import all_reduce_lamport2 as L2
    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "n_arg": "i32", "n8_arg": "i32", "tab": "*i64", "ctl_ptr": "*i32",
           "cap8": "i32", "err_addr": "i64", "err_base": "i32", "rank": "i32", "timeout_us": "i32"}
    const = {"WORLD": W, "EVEN": True, "BLOCK": L.BLOCK, "MAXB": L.MAX_CTAS, "DOFF": L.DATA_OFF, "UNIT": L2.UNIT}
    p = ptx(L2._lamport2_kernel, sig, const, L2.NUM_WARPS)
    acc = global_accesses(p)
    polls = [ln for ln in acc if "ld.volatile.global" in ln]
    assert len(polls) >= W + 1 and all(".v4.b32" in ln for ln in polls), polls[:4]
    v4st = [ln for ln in acc if ln.lstrip("@%p0123456789 ").startswith("st.global.v4.b32")]
    # 1 RS push + W RS clears + 1 AG clear + W AG pushes + out
    assert len(v4st) >= 2 * W + 3, len(v4st)
    assert not [ln for ln in acc if re.search(r"\.(b16|u16|s16)\b", ln)]
    assert "%globaltimer" in p
    for bad in ("fence.", "atom.", "st.release", "ld.acquire", "bar.red"):
        assert bad not in p, bad


@pytest.mark.gpu
def test_bad_num_warps_is_refused():
    from tdcompile.kernels.all_reduce_lamport2 import all_reduce_lamport2
    sim = world(2, "lamport2")
    x = torch.zeros(64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="num_warps"):
        sim.run(lambda ws: all_reduce_lamport2(ws, x, num_warps=2), [(), ()])


# ------------------------------------------------------------------------------ real processes
def _worker(rank, world_size, port, q):
    from real_ranks import init_rank
    dist = init_rank(rank, world_size, port, TDCOMPILE_SPIN_TIMEOUT_S="5")
    done = []
    try:
        from tdcompile.kernels.all_reduce_lamport2 import all_reduce_lamport2
        from tdcompile.kernels.symm import get_workspace
        ws = get_workspace(dist.group.WORLD.group_name)
        rnd = random.Random(11)
        calls = [(rnd.choice([1, 3, 128, 129, 400]), rnd.choice([5120, 1000, 7]), rnd.choice([None, 8, 128]),
                  rnd.choice([None, 4, 16])) for _ in range(40)]
        for i, (m, n, c, w) in enumerate(calls):       # one call at a time: the failing one is named
            x = (torch.randn(m, n, device="cuda") * (rank + 1)).to(torch.bfloat16)
            ref = x.clone()
            dist.all_reduce(ref)
            out = all_reduce_lamport2(ws, x, ctas=c, num_warps=w)
            ws.check(sync=True)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < 1e-2, (i, m, n, c, w, err)
            done.append(i)
        xs = [(torch.randn(m, n, device="cuda") * (rank + 1)).to(torch.bfloat16) for m, n, _, _ in calls]
        first = [all_reduce_lamport2(ws, x, ctas=c, num_warps=w).clone() for x, (_, _, c, w) in zip(xs, calls)]
        ws.check(sync=True)
        for _ in range(20):                            # back to back, no host sync
            outs = [all_reduce_lamport2(ws, x, ctas=c, num_warps=w) for x, (_, _, c, w) in zip(xs, calls)]
        ws.check(sync=True)
        assert all(torch.equal(o, f) for o, f in zip(outs, first))
        q.put((rank, "ok"))
    except BaseException as e:  # noqa: BLE001
        q.put((rank, f"after calls {done[-3:]}: {type(e).__name__}: {str(e)[:300]}"))
        raise


@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_real_processes(world_size):
    """Calls of varying size, grid and chunk size one at a time (a failure names the call), then
    back to back without host sync: matches NCCL, the same bits every round."""
    from real_ranks import expect_all_ok
    expect_all_ok(_worker, world_size, timeout=300)
