"""Real multi-process tests (>= 2 GPUs; skipped otherwise): the fused CUDA ops against the
unfused NCCL + cuBLAS path, 1000 back-to-back calls, 1000 CUDA-graph replays, and a peer
that never arrives -> RuntimeError naming op and rank.  NOT yet run (no multi-GPU machine)."""
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.multigpu
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, q):
    os.environ.update(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TDCOMPILE_SPIN_TIMEOUT_S="2",
                      TDCOMPILE_MAX_M="4096", NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME="lo")
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    try:
        import tdcompile.ops  # noqa: F401
        import tdcompile.ops.cuda as opc
        td, g, W = torch.ops.tdist, dist.group.WORLD.group_name, world
        dt = torch.bfloat16
        torch.manual_seed(1234 + rank)

        def rel(a, b):
            return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()

        def calls(x, a, b, sh, impl):
            return [td.all_reduce(x, g, impl), td.gemm_all_reduce(a, b, None, g, impl),
                    td.gemm_reduce_scatter(a, b, None, W, g, impl), td.all_gather_gemm(sh, [b], W, g, True, impl)[1][0]]
        import random
        rnd = random.Random(7)
        for case in range(50):
            M = rnd.choice([2, 64, 100, 128, 254, 512, 1000]) // W * W
            N, K = rnd.choice([64, 256, 512, 5120]), rnd.choice([128, 256, 1024])
            x = torch.randn(M, N, device="cuda", dtype=dt) * (rank + 1)
            a = torch.randn(M, K, device="cuda", dtype=dt) * (rank + 1)
            b = (torch.randn(N, K, device="cuda", dtype=dt) * 0.05).t()
            sh = torch.randn(max(1, M // W), K, device="cuda", dtype=dt) * (rank + 1)
            got, ref = calls(x, a, b, sh, "fused"), calls(x, a, b, sh, "unfused")
            opc.check_errors()
            for i, (o, r) in enumerate(zip(got, ref)):
                assert rel(o, r) <= 1e-2, (case, i, M, N, K, rel(o, r))
        first = [o.clone() for o in calls(x, a, b, sh, "fused")]
        for _ in range(1000):
            outs = calls(x, a, b, sh, "fused")
        opc.check_errors()
        assert all(torch.equal(o, f) for o, f in zip(outs, first))
        gr = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.cuda.graph(gr, stream=s):
            gouts = calls(x, a, b, sh, "fused")
        for _ in range(1000):
            gr.replay()
        opc.check_errors()
        assert all(torch.equal(o, f) for o, f in zip(gouts, first))
        dist.barrier()
        # a peer that never arrives: only rank 0 calls
        if rank == 0:
            td.all_reduce(x, g, "fused")
            try:
                opc.check_errors()
                q.put((rank, "no error raised"))
            except RuntimeError as e:
                q.put((rank, "ok" if ("all_reduce" in str(e) and "rank 0" in str(e)) else f"bad message: {e}"))
        else:
            q.put((rank, "ok"))
    except Exception as e:  # noqa: BLE001
        q.put((rank, f"{type(e).__name__}: {e}"))
        raise


def test_fused_ops_two_processes():
    import torch.multiprocessing as mp
    world = 2
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=600) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    assert all(v == "ok" for v in res.values()), res
