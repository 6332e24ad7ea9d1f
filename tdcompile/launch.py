"""Run a function on N ranks: under torchrun use its environment, otherwise spawn the ranks
ourselves (gloo on CPU, NCCL with one GPU per rank), so no launcher is needed."""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# NVLink multicast is forbidden on the machines we run on; keep it off in every rank.
_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int) -> torch.device:
    for k, v in _SAFE_ENV.items():
        os.environ.setdefault(k, v)
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=10))
    return device


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    device = init_process_group(rank, world_size)
    try:
        fn(device, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run(fn: Callable, world_size: int, *args) -> None:
    """Call ``fn(device, *args)`` on every rank of an initialized process group."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        device = init_process_group(rank, world)
        try:
            fn(device, *args)
        finally:
            dist.destroy_process_group()
        return
    for k, v in _SAFE_ENV.items():
        os.environ.setdefault(k, v)
    mp.spawn(_worker, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
