"""Host microseconds of a replayed ``tdist`` call's Python path, on a CPU (no GPU needed).

The real ``ops/cuda.py`` kernels are registered for CPU and run with stand-ins for what needs a
GPU (the workspace, the CUDA graph whose ``replay`` does nothing, the Triton launch), so every
call takes the replayed path of ``ops/op_graphs.py``.  Columns, all in one run:

* ``op``: ``torch.ops.tdist.<op>.default`` -- the dispatcher, ``ops/cuda.py``, ``op_graphs``;
* ``custom_op_twin``: the same kernel behind an op defined with ``torch.library.custom_op``
  (how ``ops/library.py`` defined the ops before 2026-11-27);
* ``kernel``: the ``ops/cuda.py`` function called directly (no dispatcher);
* ``op_graphs``: ``op_graphs.fused`` alone (output allocation, key, lookup, stand-in replay).

``python scripts/host_path_cpu.py --out benchmarks/results/host-path-cpu-<date>.json``
(medians of 5 runs of 20000 calls, under ``torch.no_grad()``, the weight requiring grad as a
model's parameters do).  A CPU's Python speed is not a GPU host's: compare columns, not hosts.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

KERNELS: dict = {}
_register_kernel = torch.library.register_kernel


def _keep(op, device_types, func=None, **kw):      # remember ops/cuda.py's functions as they register
    def deco(f):
        KERNELS[op] = f
        return _register_kernel(op, device_types, f, **kw)
    return deco if func is None else deco(func)


torch.library.register_kernel = _keep
import tdcompile  # noqa: E402,F401
from tdcompile.ops import cuda as opc, op_graphs  # noqa: E402
import tdcompile.kernels.all_reduce as k_ar  # noqa: E402
import tdcompile.ops.gemm_all_reduce as k_gar  # noqa: E402
from tdcompile.kernels import symm  # noqa: E402

torch.library.register_kernel = _register_kernel


class _Graph:
    def replay(self):
        pass


class _Ws:
    """A workspace with the real error word and ``Workspace.check`` (read before each replay)."""
    name, generation, phase_barrier, broken = "g", 0, None, False
    check = symm.Workspace.check

    def __init__(self):
        self.err = torch.zeros(4, dtype=torch.int32)


def _stand_ins():
    ws = _Ws()
    torch.cuda.is_current_stream_capturing = lambda: False
    opc._workspace = lambda group_name: ws
    op_graphs._capture = lambda tag, body: _Graph()
    k_ar.all_reduce = lambda ws, x, out=None, variant=None: out
    k_gar.run = lambda var, ws, a, b, bias, group_name, out=None: out
    return ws


def _us(fn, n: int = 20000, runs: int = 5) -> float:
    def once():
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6
    for _ in range(2000):
        fn()
    return round(statistics.median(once() for _ in range(runs)), 2)


def _twin(name: str, schema_fn, kernel):
    """``kernel`` behind ``tdist_twin::name`` defined with ``torch.library.custom_op``."""
    op = torch.library.custom_op(f"tdist_twin::{name}", schema_fn, mutates_args=())
    op.register_kernel("cpu", kernel)
    return getattr(torch.ops.tdist_twin, name).default


def _ar_schema(x: torch.Tensor, group_name: str, impl: str = "auto") -> torch.Tensor:
    raise NotImplementedError


def _gar_schema(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, group_name: str,
                impl: str = "auto") -> torch.Tensor:
    raise NotImplementedError


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    ws = _stand_ins()
    x, a = torch.ones(128, 64), torch.ones(128, 64)
    w = torch.ones(64, 64, requires_grad=True)
    cases = {"all_reduce": ("fused:two_shot", (x, "g"), _ar_schema, (x,)),
             "gemm_all_reduce": ("fused:one_shot", (a, w, None, "g"), _gar_schema, (a, w, None))}
    rows = []
    with torch.no_grad():
        for name, (impl, call_args, schema, sig_args) in cases.items():
            sig = opc._sig(*sig_args)
            opc._READY[(name, impl, "g", sig)] = None          # agreed and launched before
            opc._LAUNCHED.add((name, impl, "g", sig))
            kernel = KERNELS[f"tdist::{name}"]
            _register_kernel(f"tdist::{name}", "cpu", kernel)
            op, twin = getattr(torch.ops.tdist, name).default, _twin(name, schema, kernel)
            out0 = torch.empty(x.shape)
            rows.append({"op": name, "impl": impl,
                         "op_us": _us(lambda: op(*call_args, impl)),
                         "custom_op_twin_us": _us(lambda: twin(*call_args, impl)),
                         "kernel_us": _us(lambda: kernel(*call_args, impl)),
                         "op_graphs_us": _us(lambda: op_graphs.fused(name, impl, sig, sig_args, lambda: (out0,),
                                                                      lambda ws, o: None, lambda o: o[0])(ws)),
                         "torch_empty_us": _us(lambda: torch.empty(x.shape))})
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"what": "host us per replayed call, CPU stand-ins for the GPU parts", "mode": "cpu",
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "python": platform.python_version(),
           "git": rev, "command": "python scripts/host_path_cpu.py", "op_graphs_stats": dict(op_graphs.STATS),
           "results": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    for r in rows:
        print(r)
    return res


if __name__ == "__main__":
    main()
