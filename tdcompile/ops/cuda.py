"""CUDA implementations of the ``tdist::*`` ops: ``impl`` -> the family that runs it.

``impl`` is the vocabulary of ``tdcompile.config`` (``family[:variant]`` or ``"auto"``):

* ``"auto"``     -> the measured table's choice for the actual shape (``measured.agreed_times``;
                    a shape not in the table is measured now, on all ranks together);
* ``"unfused"``  -> the reference sequence (on CUDA: NCCL collective + cuBLAS GEMM);
* ``"fused"``    -> tdcompile's Triton kernels over symmetric memory (``tdcompile.kernels``);
* ``"symm_mem"`` -> torch's symmetric-memory ops (``ops/symm_mem.py``).

**No rank divergence.** The first call of every (op, impl, group, input signature) is a
collective: every rank checks whether the family can run (inputs, Triton, workspace or
buffers) and the ranks agree (``measured.all_agree``); if any rank cannot, *every* rank runs
unfused, with the reason logged. A first call inside CUDA-graph capture cannot agree (no host
sync there), so it runs unfused on every rank -- the capture point is the same on all ranks.
Kernel timeouts (a peer that never arrived) raise ``RuntimeError`` naming op and rank.

Un-graphed calls of the fused impls in ``op_graphs.REPLAYABLE`` are replayed as one CUDA graph
per call site from their third call on (``ops/op_graphs.py``): host time ~30-60 us, not 200-1000.

``RAN[(op, family)]`` counts what actually ran, so tests and the measuring harness can prove
which implementation produced a result. Importing this module does not import Triton.
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Callable, Optional

import torch

from tdcompile import measured
from tdcompile.config import family, variant
from tdcompile.ops import op_graphs, reference as ref, unfused

log = logging.getLogger("tdcompile.ops")
RAN: collections.Counter = collections.Counter()
"""``(op, family that ran)`` -> number of calls."""
RAN_IMPL: collections.Counter = collections.Counter()
"""``(op, impl that ran)`` -> number of calls, with the variant (``"fused:lamport"``; ``"unfused"``
also counts fallbacks) -- what the bench records per row."""
_READY: dict[tuple, Optional[str]] = {}   # agreed first-call verdicts: None = ready, else the reason
_LAUNCHED: set = set()                     # (op, impl, group, signature) launched at least once
_NOTED: set = set()


def _note(op: str, reason: str) -> None:
    if (op, reason) not in _NOTED:
        _NOTED.add((op, reason))
        log.info("tdist::%s: running unfused: %s", op, reason)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _world(group_name: str) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name).size()


def _sig(*tensors) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.is_contiguous()) if isinstance(t, torch.Tensor) else t
                 for t in tensors)


def _fault(what: str) -> Optional[str]:
    """Fault injection for tests: ``TDCOMPILE_FAULT_INJECT="<what>:<rank>"`` fails ``what`` on that rank."""
    spec = os.environ.get("TDCOMPILE_FAULT_INJECT", "")
    if ":" in spec:
        w, r = spec.rsplit(":", 1)
        import torch.distributed as dist
        if w == what and dist.is_initialized() and str(dist.get_rank()) == r:
            return f"fault injected into {what} on rank {r}"
    return None


def _importable(fam: str) -> Optional[str]:
    """Local (no collective) reason ``fam`` cannot run on this rank, or None."""
    try:
        if fam == "fused":
            import triton  # noqa: F401
            from tdcompile.kernels import symm  # noqa: F401
        elif fam == "symm_mem":
            import torch.distributed._symmetric_memory  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def ready(op: str, impl: str, group_name: str, sig: tuple, prepare: Callable[[], Optional[str]]) -> bool:
    """Whether ``impl`` may run ``op`` for this signature, agreed by every rank of the group.

    Decided once per signature, in two agreed phases so that no rank enters a collective
    set-up its peers skip: (1) local checks (imports, injected faults) -- all ranks agree;
    (2) ``prepare()``, run by every rank, may do collective set-up (workspace, symmetric
    buffers) and returns None or the reason this rank cannot run it -- all ranks agree."""
    key = (op, impl, group_name, sig)
    if key not in _READY:
        if _capturing():
            _note(op, f"{impl}: first call inside CUDA-graph capture (ranks cannot agree there)")
            return False
        reason = _fault(family(impl)) or _importable(family(impl))
        if measured.all_agree(reason is None, group_name):
            try:
                reason = prepare()
            except Exception as e:  # noqa: BLE001  (P2P / rendezvous / allocation failures)
                reason = f"{type(e).__name__}: {e}"
            agreed = measured.all_agree(reason is None, group_name)
        else:
            agreed = False
        if agreed:
            _READY[key] = None
        else:
            _READY[key] = f"{impl} unavailable on " + (f"this rank ({reason})" if reason else "another rank")
            log.warning("tdist::%s: %s; every rank runs unfused", op, _READY[key])
    if _READY[key] is not None:
        _note(op, _READY[key])
    return _READY[key] is None


def resolve(op: str, impl: str, group_name: str, *, m: int, n: int, k: int, dtype) -> str:
    """``impl``, with ``"auto"`` replaced by the measured choice for the actual shape."""
    if impl != "auto":
        return impl
    key = measured.Key.of(op, m=m, n=n, k=k, dtype=dtype, world=_world(group_name))
    hit = measured._AGREED.get((key, group_name))
    if hit is not None:
        return hit[0]
    if _capturing():
        _note(op, f"impl='auto' for {key.id()} first seen inside CUDA-graph capture: cannot measure there")
        return "unfused"
    from tdcompile import measure
    measured.agreed_times(key, group_name, measure.candidates(op),
                          lambda only=None: measure.measure_key(key, group_name, only))
    return measured._AGREED[(key, group_name)][0]


def _workspace(group_name: str):
    from tdcompile.kernels import symm
    import triton  # noqa: F401
    return symm.get_workspace(group_name)


def _run(op: str, impl: str, group_name: str, sig: tuple, fused: Callable, symm: Callable, unfused: Callable,
         check_fused: Callable, check_symm: Callable):
    fam = family(impl)
    if fam == "fused" and ready(op, impl, group_name, sig, check_fused):
        from tdcompile.kernels.symm import _Unsupported
        ws = _workspace(group_name)
        first = (op, impl, group_name, sig) not in _LAUNCHED
        if first:   # every rank compiles the kernels before any launches one that waits on peers
            ws.phase_barrier = lambda: measured.all_agree(True, group_name)
        try:
            out = fused(ws)
            RAN[(op, "fused")] += 1
            RAN_IMPL[(op, impl)] += 1
            return out
        except _Unsupported as e:      # shape-only reasons (workspace size): the same on every rank
            _note(op, str(e))
        finally:
            ws.phase_barrier = None
            _LAUNCHED.add((op, impl, group_name, sig))
    elif fam == "symm_mem" and ready(op, impl, group_name, sig, check_symm):
        out = symm()
        RAN[(op, "symm_mem")] += 1
        RAN_IMPL[(op, impl)] += 1
        return out
    RAN[(op, "unfused")] += 1
    RAN_IMPL[(op, "unfused")] += 1
    return unfused()


# ---------------------------------------------------------------------------- registrations
@torch.library.register_kernel("tdist::all_reduce", "cuda")
def _all_reduce_cuda(x: torch.Tensor, group_name: str, impl: str = "auto") -> torch.Tensor:
    from tdcompile.ops import symm_mem as sm
    n = x.shape[-1] if x.dim() else 1
    impl = resolve("all_reduce", impl, group_name, m=x.numel() // max(n, 1), n=n, k=0, dtype=x.dtype)
    sig = _sig(x)

    def fused(ws):
        if variant(impl) in ("one_shot", "two_shot"):
            from tdcompile.kernels import all_reduce as k
            return op_graphs.fused("all_reduce", impl, sig, (x,), lambda: (op_graphs.empty(x.shape, x),),
                               lambda ws, o: k.all_reduce(ws, x, out=o[0], variant=variant(impl)),
                               lambda o: o[0])(ws)
        if variant(impl) == "lamport":
            from tdcompile.kernels.all_reduce_lamport import all_reduce_lamport
            return all_reduce_lamport(ws, x)
        if variant(impl) == "lamport2":
            from tdcompile.kernels.all_reduce_lamport2 import all_reduce_lamport2
            return all_reduce_lamport2(ws, x)
        from tdcompile.kernels import all_reduce as k
        return k.all_reduce(ws, x, variant=variant(impl)) if variant(impl) else k.all_reduce(ws, x)

    def check_fused():
        if variant(impl) == "lamport":
            from tdcompile.kernels.all_reduce_lamport import prepare
            return prepare(_workspace(group_name), x)
        if variant(impl) == "lamport2":
            from tdcompile.kernels.all_reduce_lamport2 import prepare
            return prepare(_workspace(group_name), x)
        from tdcompile.kernels.all_reduce import unsupported_reason
        return unsupported_reason(_workspace(group_name), x)

    return _run("all_reduce", impl, group_name, sig, fused,
                lambda: sm.all_reduce(x, group_name, variant(impl)), lambda: ref.all_reduce(x, group_name),
                check_fused, lambda: sm.prepare_all_reduce(x.shape, x.dtype, group_name))


@torch.library.register_kernel("tdist::gemm_all_reduce", "cuda")
def _gemm_all_reduce_cuda(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], group_name: str,
                          impl: str = "auto") -> torch.Tensor:
    from tdcompile.ops import gemm_all_reduce as gar, symm_mem as sm
    impl = resolve("gemm_all_reduce", impl, group_name, m=a.shape[0], n=b.shape[1], k=a.shape[1], dtype=a.dtype)
    shape, sig = (a.shape[0], b.shape[1]), _sig(a, b, bias)
    if gar.writes_out(variant(impl)):         # zero copy (one/two-shot) or copy-engine chunks: replayable
        fused = op_graphs.fused("gemm_all_reduce", impl, sig, (a, b, bias), lambda: (op_graphs.empty(shape, a),),
                            lambda ws, o: gar.run(variant(impl), ws, a, b, bias, group_name, out=o[0]),
                            lambda o: o[0])
    else:
        def fused(ws):
            return gar.run(variant(impl), ws, a, b, bias, group_name)
    return _run("gemm_all_reduce", impl, group_name, sig, fused,
                lambda: sm.gemm_all_reduce(a, b, bias, group_name, variant(impl)),
                lambda: unfused.gemm_all_reduce(a, b, bias, group_name),
                lambda: gar.prepare(variant(impl), _workspace(group_name), a, b, bias),
                lambda: sm.prepare_all_reduce(shape, a.dtype, group_name))


@torch.library.register_kernel("tdist::all_gather_gemm", "cuda")
def _all_gather_gemm_cuda(a_shard: torch.Tensor, bs: list[torch.Tensor], world_size: int, group_name: str,
                          return_a: bool = False, impl: str = "auto") -> tuple[torch.Tensor, list[torch.Tensor]]:
    from tdcompile.ops import symm_mem as sm
    impl = resolve("all_gather_gemm", impl, group_name, m=a_shard.shape[0] * world_size,
                   n=sum(b.shape[1] for b in bs), k=a_shard.shape[1], dtype=a_shard.dtype)

    sig = _sig(a_shard, *bs, world_size, return_a)
    M = a_shard.shape[0] * world_size

    def fused(ws):
        if variant(impl) == "ce":       # cuBLAS per shard, shards pulled by the copy engine
            from tdcompile.kernels.all_gather_gemm_ce import all_gather_gemm_ce
            return op_graphs.fused(
                "all_gather_gemm", impl, sig, (a_shard, *bs),
                lambda: ((op_graphs.empty((M, a_shard.shape[1]), a_shard) if return_a else None),
                         *[op_graphs.empty((M, b.shape[1]), a_shard) for b in bs]),
                lambda ws, o: all_gather_gemm_ce(ws, a_shard, list(bs), return_a, out=(o[0], list(o[1:]))),
                lambda o: (o[0] if return_a else a_shard.new_empty(0), list(o[1:])))(ws)
        from tdcompile.kernels.all_gather_gemm import all_gather_gemm
        return all_gather_gemm(ws, a_shard, list(bs), return_a)

    def check_fused():
        from tdcompile.kernels.all_gather_gemm import unsupported_reason
        ws = _workspace(group_name)
        return f"world_size {world_size} != group size {ws.world}" if ws.world != world_size else \
            unsupported_reason(ws, a_shard, bs)

    return _run("all_gather_gemm", impl, group_name, sig, fused,
                lambda: sm.all_gather_gemm(a_shard, list(bs), world_size, group_name, return_a),
                lambda: ref.all_gather_gemm(a_shard, bs, world_size, group_name, return_a),
                check_fused, lambda: sm.prepare_all_gather_gemm(a_shard, world_size, group_name))


@torch.library.register_kernel("tdist::gemm_reduce_scatter", "cuda")
def _gemm_reduce_scatter_cuda(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], world_size: int,
                              group_name: str, impl: str = "auto") -> torch.Tensor:
    from tdcompile.ops import symm_mem as sm
    impl = resolve("gemm_reduce_scatter", impl, group_name, m=a.shape[0], n=b.shape[1], k=a.shape[1], dtype=a.dtype)

    sig = _sig(a, b, bias, world_size)

    def fused(ws):
        if variant(impl) == "ce":       # cuBLAS per destination, partials pushed by the copy engine
            from tdcompile.kernels.gemm_reduce_scatter_ce import gemm_reduce_scatter_ce
            return op_graphs.fused("gemm_reduce_scatter", impl, sig, (a, b, bias),
                               lambda: (op_graphs.empty((a.shape[0] // world_size, b.shape[1]), a),),
                               lambda ws, o: gemm_reduce_scatter_ce(ws, a, b, bias, out=o[0]),
                               lambda o: o[0])(ws)
        from tdcompile.kernels.gemm_reduce_scatter import gemm_reduce_scatter
        return gemm_reduce_scatter(ws, a, b, bias)

    def check_fused():
        if variant(impl) == "ce":
            from tdcompile.kernels.gemm_reduce_scatter_ce import unsupported_reason
        else:
            from tdcompile.kernels.gemm_reduce_scatter import unsupported_reason
        ws = _workspace(group_name)
        return f"world_size {world_size} != group size {ws.world}" if ws.world != world_size else \
            unsupported_reason(ws, a, b, bias)

    return _run("gemm_reduce_scatter", impl, group_name, sig, fused,
                lambda: sm.gemm_reduce_scatter(a, b, group_name),
                lambda: ref.gemm_reduce_scatter(a, b, bias, world_size, group_name),
                check_fused, lambda: sm.prepare_gemm_reduce_scatter(a, bias, world_size, group_name))


@torch.library.register_kernel("tdist::all_reduce_rmsnorm", "cuda")
def _all_reduce_rmsnorm_cuda(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             group_name: str, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    impl = resolve("all_reduce_rmsnorm", impl, group_name, m=x.numel() // max(n, 1), n=n, k=0, dtype=x.dtype)
    sig = _sig(x, residual, weight)

    def fused(ws):
        if variant(impl) == "lamport":
            from tdcompile.kernels.all_reduce_rmsnorm_lamport import all_reduce_rmsnorm_lamport
            return all_reduce_rmsnorm_lamport(ws, x, residual, weight, eps)
        if variant(impl) == "lamport2":
            from tdcompile.kernels.all_reduce_rmsnorm_lamport2 import all_reduce_rmsnorm_lamport2
            return all_reduce_rmsnorm_lamport2(ws, x, residual, weight, eps)
        from tdcompile.kernels.all_reduce_rmsnorm import all_reduce_rmsnorm
        return op_graphs.fused("all_reduce_rmsnorm", impl, sig, (x, residual, weight, float(eps)),
                           lambda: (op_graphs.empty(x.shape, x), op_graphs.empty(x.shape, x)),
                           lambda ws, o: all_reduce_rmsnorm(ws, x, residual, weight, eps, variant=variant(impl) or "auto",
                                                            out=o[0], residual_out=o[1]),
                           tuple)(ws)

    def check_fused():
        ws = _workspace(group_name)
        if variant(impl) == "lamport":
            from tdcompile.kernels.all_reduce_rmsnorm_lamport import prepare
            return prepare(ws, x, residual, weight)
        if variant(impl) == "lamport2":
            from tdcompile.kernels.all_reduce_rmsnorm_lamport2 import prepare
            return prepare(ws, x, residual, weight)
        from tdcompile.kernels.all_reduce_rmsnorm import unsupported_reason
        return unsupported_reason(ws, x, residual, weight)

    return _run("all_reduce_rmsnorm", impl, group_name, sig, fused,
                lambda: ref.all_reduce_rmsnorm(x, residual, weight, eps, group_name),
                lambda: unfused.all_reduce_rmsnorm(x, residual, weight, eps, group_name),
                check_fused, lambda: "no symm_mem implementation of all_reduce_rmsnorm")


@torch.library.register_kernel("tdist::gemm_all_reduce_rmsnorm", "cuda")
def _gemm_all_reduce_rmsnorm_cuda(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor],
                                  residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str,
                                  impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``fused:one_shot`` / ``fused:two_shot``: cuBLAS writes a @ b into this rank's symmetric input
    area and the all-reduce + add + RMSNorm kernel reads it in place (no copy-in pass: at 4096x5120
    bf16 the copy-in is ~40 of ~180 us).  ``unfused``: what Inductor runs (cuBLAS, NCCL in place,
    one add + RMSNorm kernel)."""
    M, N = a.shape[0], b.shape[1]
    impl = resolve("gemm_all_reduce_rmsnorm", impl, group_name, m=M, n=N, k=a.shape[1], dtype=a.dtype)
    res2d = residual.reshape(M, N)                                           # [M, N] view of [..., N]
    sig = _sig(a, b, bias, residual, weight)

    def body(ws, o):
        from tdcompile.kernels.all_reduce import symm_input
        from tdcompile.kernels.all_reduce_rmsnorm import all_reduce_rmsnorm
        buf = symm_input(ws, (M, N), a.dtype)                                # [M, N] symmetric
        torch.mm(a, b, out=buf) if bias is None else torch.addmm(bias, a, b, out=buf)
        all_reduce_rmsnorm(ws, buf, res2d, weight, eps, variant=variant(impl) or "auto", out=o[0], residual_out=o[1])

    fused = op_graphs.fused("gemm_all_reduce_rmsnorm", impl, sig, (a, b, bias, res2d, weight, float(eps)),
                        lambda: (op_graphs.empty((M, N), a), op_graphs.empty((M, N), a)), body,
                        lambda o: (o[0].view(residual.shape), o[1].view(residual.shape)))

    def check_fused():
        from tdcompile.kernels.all_reduce import symm_input
        from tdcompile.kernels.all_reduce_rmsnorm import unsupported_reason
        ws = _workspace(group_name)
        probe = torch.empty((M, N), dtype=a.dtype, device=a.device)
        reason = unsupported_reason(ws, probe, res2d, weight)
        if reason is None:
            symm_input(ws, (M, N), a.dtype)              # allocate the regions now (collective)
        return reason

    def run_unfused():
        normed, new_res = unfused.add_rmsnorm(unfused.gemm_all_reduce(a, b, bias, group_name), res2d, weight, eps)
        return normed.view(residual.shape), new_res.view(residual.shape)

    return _run("gemm_all_reduce_rmsnorm", impl, group_name, sig, fused,
                lambda: ref.gemm_all_reduce_rmsnorm(a, b, bias, residual, weight, eps, group_name), run_unfused,
                check_fused, lambda: "no symm_mem implementation of gemm_all_reduce_rmsnorm")


def check_errors(group_name: str | None = None, sync: bool = True) -> None:
    """Raise ``RuntimeError`` (op and rank named) if a fused kernel timed out waiting for a peer."""
    from tdcompile.kernels import symm
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    for name, ws in list(symm._WORKSPACES.items()):
        if group_name is None or name == group_name:
            ws.check()
