"""Run a function on N ranks: under torchrun use its environment, otherwise spawn the ranks
ourselves (gloo on CPU, NCCL with one GPU per rank), so no launcher is needed. One rank runs
in this process (a one-rank group), which needs no spawning at all."""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""NVLink multicast is forbidden on the machines we run on: every rank (and every script that
starts ranks) keeps it off with these variables. The one definition: import it from here."""


def apply_safe_env() -> None:
    """Set :data:`SAFE_ENV` in this process (values the user already set are kept)."""
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def say(*a) -> None:
    """Progress line, printed by rank 0 only (or before any group exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, store: Optional[dist.Store] = None) -> torch.device:
    """Join (or create) the default group: NCCL with one GPU per rank when there are enough GPUs,
    gloo on CPU otherwise. Returns this rank's device."""
    apply_safe_env()
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw = {} if store is None else {"store": store}
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=10), **kw)
    return device


def _worker(rank: int, world_size: int, port: int, t0: float, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    device = init_process_group(rank, world_size)
    print(f"[rank {rank}] ready on {device} ({dist.get_backend()}, {time.time() - t0:.0f} s)", flush=True)
    try:
        fn(device, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run(fn: Callable, world_size: int, *args) -> None:
    """Call ``fn(device, *args)`` on every rank of an initialized process group."""
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        device = init_process_group(rank, world)
        try:
            fn(device, *args)
        finally:
            dist.destroy_process_group()
        return
    apply_safe_env()
    if world_size == 1:
        created = not dist.is_initialized()
        device = init_process_group(0, 1, store=dist.HashStore() if created else None)
        try:
            fn(device, *args)
        finally:
            if created:
                dist.destroy_process_group()
        return
    kind = "NCCL, one GPU each" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size \
        else "gloo on CPU"
    print(f"starting {world_size} ranks ({kind}); each imports torch and transformers first ...", flush=True)
    mp.spawn(_worker, args=(world_size, _free_port(), time.time(), fn, args), nprocs=world_size, join=True)
