"""Shared helper of the real-process GPU tests: W spawned processes, one per GPU, each running
``target(rank, world, port, queue, *args)`` and putting ``(rank, "ok" or what went wrong)``."""
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, world: int, *args, timeout: float = 400) -> dict:
    """``{rank: message}`` from ``world`` processes of ``target``; stragglers are killed."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, q, *args)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=timeout) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    return res


def expect_all_ok(target, world: int, *args, timeout: float = 400) -> None:
    """The body of a real-process test: skip without ``world`` GPUs, else every rank must say "ok"."""
    import pytest
    import torch
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    res = spawn(target, world, *args, timeout=timeout)
    assert all(v == "ok" for v in res.values()), res


def init_rank(rank: int, world: int, port: int, **env: str):
    """In a spawned rank: the launcher's safe environment plus ``env``, this rank's GPU, the NCCL
    group; returns ``torch.distributed``."""
    import os
    import torch
    import torch.distributed as dist
    from tdcompile.launch import SAFE_ENV
    os.environ.update(SAFE_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME="lo",
                      **env)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    return dist


def failure(e: BaseException) -> str:
    """What a rank reports for an exception: type, message and the end of the traceback."""
    import traceback
    return f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"


def compiled_together(ws, dist, fn):
    """``fn()`` (a launcher call) with a host barrier between its first phase (compile and load)
    and its launches, as ``ops.cuda`` does on a variant's first call: no rank launches a kernel
    that waits on a peer while that peer is still compiling."""
    ws.phase_barrier = dist.barrier
    try:
        return fn()
    finally:
        ws.phase_barrier = None
