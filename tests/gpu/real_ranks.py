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
