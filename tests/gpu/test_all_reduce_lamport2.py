"""Two-shot Lamport all-reduce: tdcompile/kernels/all_reduce_lamport2.py.

``gpu``: one GPU, simulated ranks (SimWorld); the offline PTX check needs only Triton (run it on
a CPU machine with ``pytest --noconftest -m gpu -k ptx <this file>``).  Same exactness contract
as the one-shot kernel: bit-identical to the fp32 rank-order sum of the inputs with -0.0 replaced
by +0.0, on every rank (the owner of a shard casts once, every rank receives its bits)."""
import os
import random
import re

import pytest
import torch
from sim_ranks import poison, world  # noqa: E402  (tests/gpu helpers)
from test_all_reduce_lamport import check, rank_inputs, sizes  # noqa: E402


def _loop(ws, xs, outs, ctas, warps=None):
    """Per-rank generator: back-to-back calls, no host sync; grid and chunk size vary per call."""
    from tdcompile.kernels.all_reduce_lamport2 import all_reduce_lamport2
    got = []
    for x, o, c, w in zip(xs, outs, ctas, warps or [None] * len(xs)):
        got.append((yield from all_reduce_lamport2(ws, x, out=o, ctas=c, num_warps=w)))
    return got


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("W", [2, 4])
def test_back_to_back_varying_sizes(W, dtype):
    """All calls in flight at once; sizes shrink and grow (ranks owning nothing included), grid
    and chunk size change from call to call."""
    sim = world(W)
    rnd = random.Random(W * 17 + (dtype == torch.float16))
    shapes = sizes(W + 20 * (dtype == torch.float16))
    rnd.shuffle(shapes)
    shapes = shapes + shapes[::-1]
    xs = [rank_inputs(s, W, dtype, seed=2000 * W + i) for i, s in enumerate(shapes)]
    outs = [[poison(torch.empty(s, device="cuda", dtype=dtype)) for s in shapes] for _ in range(W)]
    ctas = [rnd.choice([None, None, 1, 3, 8, 64, 128]) for _ in shapes]
    warps = [rnd.choice([None, 4, 8, 16]) for _ in shapes]
    for w in sorted(set(warps), key=str):   # load every variant first: no module load while a peer spins
        x1 = rank_inputs((1, 8), W, dtype, seed=5)
        sim.run(lambda ws, x: _loop(ws, [x], [None], [None], [w]), [(x1[r],) for r in range(W)])
        sim.check()
    sim.run(lambda ws, xl, ol: _loop(ws, xl, ol, ctas, warps), [([x[r] for x in xs], outs[r]) for r in range(W)])
    sim.check()
    for i, s in enumerate(shapes):
        for r in range(W):
            check(outs[r][i], xs[i], dtype, (i, s, r, ctas[i], warps[i]))


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_cuda_graph_replays_and_eager_after(W):
    """5 calls per replay (the slot rotation shifts from replay to replay, device state only)."""
    sim = world(W)
    dtype = torch.bfloat16
    shapes = [(128, 5120), (64, 5120), (3, 7), (1, 8192), (200, 1000)]
    ctas = [None, 8, None, 3, None]
    xs = [rank_inputs(s, W, dtype, seed=60 + i) for i, s in enumerate(shapes)]
    outs = [[torch.empty(s, device="cuda", dtype=dtype) for s in shapes] for _ in range(W)]

    def body():
        sim.run(lambda ws, xl, ol: _loop(ws, xl, ol, ctas), [([x[r] for x in xs], outs[r]) for r in range(W)])

    def verify(tag):
        for i in range(len(shapes)):
            for r in range(W):
                check(outs[r][i], xs[i], dtype, (tag, i, r))
    body()
    sim.check()
    verify("eager")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
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
        fresh = rank_inputs(s, W, dtype, seed=95 + i)
        for r in range(W):
            xs[i][r].copy_(fresh[r])
    g.replay()
    sim.check()
    verify("new inputs")
    body()
    sim.check()
    verify("eager after graph")


@pytest.mark.gpu
def test_peer_never_arrives():
    from tdcompile.kernels.all_reduce_lamport2 import all_reduce_lamport2
    from tdcompile.kernels.symm import SimWorld
    sim = SimWorld(2, timeout_s=0.2)
    x = rank_inputs((64, 512), 2, torch.bfloat16, seed=3)[0]
    sim.run(lambda ws: all_reduce_lamport2(ws, x), [()], ranks=[0])    # rank 1 never calls
    with pytest.raises(RuntimeError, match=r"all_reduce: rank 0 timed out waiting for a peer"):
        sim.check()


@pytest.mark.gpu
def test_bad_num_warps_and_size_are_refused():
    from tdcompile.kernels.all_reduce_lamport import LAMPORT_MAX_BYTES
    from tdcompile.kernels.all_reduce_lamport2 import all_reduce_lamport2
    from tdcompile.kernels.symm import _Unsupported
    sim = world(2)
    big = torch.zeros(LAMPORT_MAX_BYTES // 2 + 8, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(_Unsupported):
        sim.run(lambda ws: all_reduce_lamport2(ws, big), [(), ()])
    x = torch.zeros(64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="num_warps"):
        sim.run(lambda ws: all_reduce_lamport2(ws, x, num_warps=2), [(), ()])


# ------------------------------------------------------------------------------ real processes
def _worker(rank, world_size, port, q):
    from tdcompile.launch import SAFE_ENV
    os.environ.update(SAFE_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TDCOMPILE_SPIN_TIMEOUT_S="5",
                      NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME="lo")
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", rank))
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
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, q)) for r in range(world_size)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=300) for _ in range(world_size))
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert all(v == "ok" for v in res.values()), res
