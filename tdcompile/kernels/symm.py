"""Small internal interface to symmetric memory: buffers, peer pointer tables, signal
arrays, host barrier, and the per-process-group ``Workspace`` the kernels run in.

Backends (chosen once per process group, ``TDCOMPILE_SYMM_BACKEND=auto|nvshmem|torch``):

1. **nvshmem4py**, bootstrapped lazily from the torch process group (rank 0's unique id is
   broadcast over the group), so users never call NVSHMEM themselves.
2. **torch symmetric memory** (``torch.distributed._symmetric_memory``, CUDA backend): the
   fallback when nvshmem4py is missing or fails to start (logged notice).
3. **simulated** (``SimWorld``): one process, one GPU, W "ranks" = W buffers + W streams.
   Used by the single-GPU tests and benchmark; peers are plain buffers on the same GPU.

Every buffer is a flat uint8 tensor; ``ptrs`` is an int64 device tensor of the peers' base
addresses as seen from this GPU; ``peers`` are local-device views of the peers' buffers
(for copy-engine pulls).  Workspaces size their regions from ``TDCOMPILE_MAX_M`` (rows),
never allocate while a CUDA graph is being captured, and are freed at exit.
"""
from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("tdcompile.ops")

OPS = ("all_reduce", "gemm_all_reduce", "all_gather_gemm", "gemm_reduce_scatter", "all_reduce_rmsnorm")
PAD_SLOTS = 256          # blocks per barrier channel
PAD_CHANNELS = 8         # 0,1: all_reduce; 2,3: all_gather_gemm entry/exit; 4,5: gemm_all_reduce_ce ready/reduced;
                         # 6,7: gemm_reduce_scatter_ce prev/pushed
MAX_WORLD = 8


def max_m() -> int:
    return int(os.environ.get("TDCOMPILE_MAX_M", "8192"))


SPIN_TIMEOUT_S = 300.0
"""Default bound of every spin-wait on a peer (``TDCOMPILE_SPIN_TIMEOUT_S`` overrides).  A peer
may legitimately be late by as long as its host is busy -- e.g. Inductor still compiling the
graph this rank already runs, which took more than the former 10 s default at TP=4 (E2E decode
of bench-h200-tp4-20261127-050356 timed out there) -- so the bound is of the order of NCCL's
watchdog, not of a kernel's duration; tests set a few seconds."""


def spin_timeout_us() -> int:
    return int(float(os.environ.get("TDCOMPILE_SPIN_TIMEOUT_S", str(SPIN_TIMEOUT_S))) * 1e6)


@dataclass
class SymmAlloc:
    local: torch.Tensor            # this rank's buffer, flat uint8
    ptrs: torch.Tensor             # int64 [W] device tensor: peer base addresses
    peers: list                    # local-device views of every rank's buffer (flat uint8)
    nbytes: int


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


# ------------------------------------------------------------------------------ backends
class _NvshmemBackend:
    name = "nvshmem"
    _initialized = False

    def __init__(self, pg, rank: int, world: int):
        import torch.distributed as dist
        import nvshmem.core as nvshmem
        from nvshmem import bindings
        from cuda.core import Device
        self.nvb = bindings
        self.nv, self.pg, self.rank, self.world = nvshmem, pg, rank, world
        if world != dist.get_world_size():
            raise RuntimeError("nvshmem backend needs the group to span the whole job")
        os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", os.environ.get("TDCOMPILE_NVSHMEM_HEAP", "8G"))
        os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
        os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
        if not _NvshmemBackend._initialized:
            dev = Device(torch.cuda.current_device())
            dev.set_current()
            obj = [nvshmem.get_unique_id() if rank == 0 else None]
            dist.broadcast_object_list(obj, src=dist.get_global_rank(pg, 0), group=pg)
            nvshmem.init(device=dev, uid=obj[0], rank=rank, nranks=world, initializer_method="uid")
            _NvshmemBackend._initialized = True
            atexit.register(_NvshmemBackend._finalize)

    def alloc(self, nbytes: int) -> SymmAlloc:
        t = self.nv.tensor((nbytes,), dtype=torch.uint8)
        addrs = [int(self.nvb.ptr(t.data_ptr(), pe)) for pe in range(self.world)]
        if any(a == 0 for a in addrs):
            self.nv.free_tensor(t)
            raise RuntimeError("nvshmem_ptr returned NULL: peers not P2P-reachable")
        peers = [t if pe == self.rank else self.nv.get_peer_tensor(t, pe) for pe in range(self.world)]
        t.zero_()
        return SymmAlloc(t, torch.tensor(addrs, dtype=torch.int64, device=t.device), peers, nbytes)

    def free(self, a: SymmAlloc) -> None:
        a.peers = []
        self.nv.free_tensor(a.local)

    def barrier(self) -> None:
        import torch.distributed as dist
        torch.cuda.synchronize()
        dist.barrier(group=self.pg)

    @staticmethod
    def _finalize():
        for ws in list(_WORKSPACES.values()):
            ws.free()
        try:
            import nvshmem.core as nvshmem
            nvshmem.finalize()
        except Exception:  # pragma: no cover - best effort at exit
            pass


class _TorchSymmBackend:
    name = "torch"

    def __init__(self, pg, rank: int, world: int):
        import torch.distributed._symmetric_memory as symm_mem
        self.sm, self.pg, self.rank, self.world = symm_mem, pg, rank, world
        self.group_name = pg.group_name
        self._keep = []

    def alloc(self, nbytes: int) -> SymmAlloc:
        t = self.sm.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
        hdl = self.sm.rendezvous(t, self.group_name)
        peers = [t if p == self.rank else hdl.get_buffer(p, (nbytes,), torch.uint8) for p in range(self.world)]
        t.zero_()
        self._keep.append(hdl)
        return SymmAlloc(t, torch.tensor(list(hdl.buffer_ptrs), dtype=torch.int64, device=t.device), peers, nbytes)

    def free(self, a: SymmAlloc) -> None:
        a.peers = []

    def barrier(self) -> None:
        import torch.distributed as dist
        torch.cuda.synchronize()
        dist.barrier(group=self.pg)


# ------------------------------------------------------------------------------ workspace
class Workspace:
    """Per (process group, rank) runtime: symmetric regions, pads, epochs, error word."""

    def __init__(self, rank: int, world: int, backend=None, sim: "SimWorld | None" = None, name: str = ""):
        if world < 2 or world > MAX_WORLD or world & (world - 1):
            raise ValueError(f"tdcompile kernels support world sizes 2, 4, 8 (got {world})")
        self.rank, self.world, self.backend, self.sim, self.name = rank, world, backend, sim, name
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_m = max_m()
        self.timeout_us = spin_timeout_us()
        self.regions: dict[str, SymmAlloc] = {}
        self.generation = 0         # bumped whenever a region is (re)allocated: CUDA graphs that hold
                                    # the old addresses must not be replayed (``ops/op_graphs.py``)
        # host-mapped pinned error word (read by the host without synchronising)
        self.err = torch.zeros(4, dtype=torch.int32, pin_memory=True)
        self.epoch = torch.zeros(len(OPS), dtype=torch.int32, device=self.device)
        self.side = torch.cuda.Stream(device=self.device, priority=-1)
        self.progress = torch.zeros(MAX_WORLD, dtype=torch.int32, device=self.device)  # AG shard flags
        self.pads = self.region("pads", PAD_CHANNELS * PAD_SLOTS * MAX_WORLD * 4)
        self.warmed: set = set()
        self.broken = False
        self.phase_barrier = None   # set by ops.cuda for a first launch: called after phase 1 (preload)

    # -- symmetric regions (collective: same names and sizes in the same order on every rank)
    def region(self, name: str, nbytes: int) -> SymmAlloc:
        cur = self.regions.get(name)
        if cur is not None and cur.nbytes >= nbytes:
            return self._view(name) if self.sim else cur
        if _capturing():
            raise _Unsupported(f"symmetric workspace '{name}' would grow during CUDA-graph capture")
        nbytes = (nbytes + 4095) // 4096 * 4096
        self.generation += 1
        if self.sim is not None:
            self.regions[name] = self.sim.alloc(name, nbytes, self.rank)
            return self.regions[name]
        if cur is not None:
            self.backend.barrier()
            self.backend.free(cur)
        self.regions[name] = self.backend.alloc(nbytes)
        torch.cuda.synchronize()
        return self.regions[name]

    def _view(self, name: str) -> SymmAlloc:
        a = self.sim.view(name, self.rank)
        self.regions[name] = a
        return a

    def bump_epoch(self, op: str) -> torch.Tensor:
        """Device-side epoch for ``op``: incremented on the current stream, read by kernels."""
        i = OPS.index(op)
        e = self.epoch[i:i + 1]
        e.add_(1)
        return e

    @property
    def err_addr(self) -> int:
        return self.err.data_ptr()

    def check(self, sync: bool = False) -> None:
        """Raise ``RuntimeError`` naming the op and rank if a kernel recorded a timeout."""
        if sync:
            torch.cuda.synchronize()
        code = int(self.err[0])
        if code:
            from tdcompile.kernels.signals import decode_error
            op_id, rank, what = decode_error(code)
            op = OPS[op_id] if 0 <= op_id < len(OPS) else f"op#{op_id}"
            self.broken = True
            kind = {1: "a barrier", 2: "a peer's tile flag", 3: "a shard flag (copy engine pull)",
                    4: "the exit barrier", 5: "the middle barrier"}.get(what, "a peer")
            raise RuntimeError(f"tdist::{op}: rank {rank} timed out waiting for {kind} "
                               f"(group {self.name!r}, world {self.world}); the peer never arrived. "
                               f"Symmetric workspace state is now undefined.")
        if self.broken:
            raise RuntimeError(f"tdist: workspace of group {self.name!r} rank {self.rank} is broken by an earlier timeout")

    def free(self) -> None:
        if self.sim is None and self.backend is not None:
            for a in self.regions.values():
                try:
                    self.backend.free(a)
                except Exception:  # pragma: no cover
                    pass
        self.regions.clear()


def phased(gen_fn):
    """Launcher decorator: the body is a generator yielding between phases.  Real groups
    run it straight through; simulated ranks get the generator (``SimWorld.run`` steps all
    ranks phase by phase)."""
    import functools

    @functools.wraps(gen_fn)
    def wrapper(ws, *args, **kwargs):
        gen = gen_fn(ws, *args, **kwargs)
        if ws.sim is not None:
            return gen
        try:
            next(gen)                   # phase 1: checks, allocations, preload (compile + load)
            barrier = getattr(ws, "phase_barrier", None)
            if barrier is not None:     # first launch of a variant: no rank launches a waiting
                barrier()               # kernel while a peer is still compiling (ops.cuda sets it)
            while True:
                next(gen)
        except StopIteration as e:
            return e.value
    return wrapper


class _Unsupported(Exception):
    """Raised by launchers when the fused path cannot run; ``ops.cuda`` falls back."""


# ------------------------------------------------------------------------------ simulation
class SimWorld:
    """W simulated ranks on one GPU: one Workspace, buffer set and stream per rank."""

    def __init__(self, world: int, timeout_s: float | None = None):
        self.world = world
        self.allocs: dict[str, list[torch.Tensor]] = {}
        self.streams = [torch.cuda.Stream() for _ in range(world)]
        self.ws = [Workspace(r, world, sim=self, name=f"sim{world}") for r in range(world)]
        if timeout_s is not None:
            for w in self.ws:
                w.timeout_us = int(timeout_s * 1e6)

    def alloc(self, name: str, nbytes: int, rank: int) -> SymmAlloc:
        old = self.allocs.get(name)
        if old is None or old[0].numel() < nbytes:
            torch.cuda.synchronize()
            self.allocs[name] = [torch.zeros(nbytes, dtype=torch.uint8, device="cuda") for _ in range(self.world)]
            self.allocs[name + "#ptrs"] = torch.tensor([t.data_ptr() for t in self.allocs[name]],
                                                       dtype=torch.int64, device="cuda")
        return self.view(name, rank)

    def view(self, name: str, rank: int) -> SymmAlloc:
        bufs = self.allocs[name]
        return SymmAlloc(bufs[rank], self.allocs[name + "#ptrs"], bufs, bufs[0].numel())

    def run(self, fn, per_rank_args, ranks=None):
        """Run ``fn(ws_r, *args_r)`` for every rank, each on its own stream (forked from and
        joined into the current stream, so this also works under CUDA-graph capture).

        In simulation the launchers return generators that yield between phases; ranks are
        stepped in lock-step, so no rank issues a host operation that can serialise the GPU
        (same-device memcpy, cudaMalloc) between two peers' launches of waiting kernels."""
        import inspect
        cur = torch.cuda.current_stream()
        ranks = list(range(self.world) if ranks is None else ranks)
        outs = [None] * len(ranks)
        gens = {}
        for i, r in enumerate(ranks):
            s = self.streams[r]
            s.wait_stream(cur)
            with torch.cuda.stream(s):
                out = fn(self.ws[r], *per_rank_args[r])
            if inspect.isgenerator(out):
                gens[i] = out
            else:
                outs[i] = out
        while gens:
            for i in list(gens):
                with torch.cuda.stream(self.streams[ranks[i]]):
                    try:
                        next(gens[i])
                    except StopIteration as e:
                        outs[i] = e.value
                        del gens[i]
        for r in ranks:
            cur.wait_stream(self.streams[r])
        return outs

    def check(self, sync: bool = True) -> None:
        if sync:
            torch.cuda.synchronize()
        for w in self.ws:
            w.check()


# ------------------------------------------------------------------------------ real groups
_WORKSPACES: dict[str, Workspace] = {}
_NOTICED: set = set()


def get_workspace(group_name: str) -> Workspace:
    ws = _WORKSPACES.get(group_name)
    if ws is not None:
        return ws
    if _capturing():
        raise _Unsupported("workspace creation during CUDA-graph capture")
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group
    pg = _resolve_process_group(group_name)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    choice = os.environ.get("TDCOMPILE_SYMM_BACKEND", "auto")
    backend = None

    def all_ok(ok: bool) -> bool:   # every rank takes the same backend (no rank left in a collective)
        t = torch.tensor([int(ok)], dtype=torch.int32, device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=pg)
        return bool(t.item())

    if choice in ("auto", "nvshmem"):
        err = None
        try:
            import nvshmem.core  # noqa: F401
        except Exception as e:  # noqa: BLE001
            err = e
        if all_ok(err is None):
            try:
                backend = _NvshmemBackend(pg, rank, world)
            except Exception as e:  # noqa: BLE001
                err = e
            if not all_ok(backend is not None):
                backend = None
        if backend is None:
            if choice == "nvshmem":
                raise RuntimeError(f"nvshmem backend unavailable on some rank ({err})")
            if "nvshmem" not in _NOTICED:
                _NOTICED.add("nvshmem")
                log.info("tdcompile: nvshmem4py unavailable on some rank (%s); using torch symmetric memory", err)
    if backend is None:
        backend = _TorchSymmBackend(pg, rank, world)
    ws = Workspace(rank, world, backend=backend, name=group_name)
    _WORKSPACES[group_name] = ws
    return ws


@atexit.register
def _free_all() -> None:
    for ws in list(_WORKSPACES.values()):
        ws.free()
    _WORKSPACES.clear()
