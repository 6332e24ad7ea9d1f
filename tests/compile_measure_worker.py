"""One gloo rank of ``test_compile_time_measure``: ``python compile_measure_worker.py RANK RDZV CACHE
SCENARIO`` compiles the HF-shaped toy tail (row-parallel linear -> all_reduce -> + residual ->
RMSNorm) with the whole tdist backend, as on a GPU (``backend._on_gpu`` -> True), with the
measuring harness replaced by a stub that times nothing but runs a real gloo collective, and
prints ``RESULT <json>``: what was measured while compiling, the decisions, the output error."""
from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.distributed as dist


def main(rank: int, rdzv: str, cache: str, scenario: str) -> dict:
    import gloo_ranks
    os.environ.update(TDCOMPILE_CACHE_DIR=os.path.join(cache, f"rank{rank}"))
    gloo_ranks.init(rank, 2, rdzv)
    if scenario == "storm":
        return agreement_storm()
    import tdcompile
    from tdcompile import backend, measure
    from tdcompile.config import Options
    from rmsnorm_toys import RowParallelResidualNorm, toy_inputs, toy_model

    backend._on_gpu = lambda: True                  # decide as on a GPU: from (stub) measurements
    calls = []

    def stub(key, group_name, only=None):           # both ranks must be here, with real tensors
        from torch._subclasses.fake_tensor import FakeTensor
        t = torch.ones(1)
        joined = (not isinstance(t, FakeTensor)) and dist.all_reduce(t, group=dist.group.WORLD) is None
        calls.append({"key": key.id(), "only": only, "real": joined, "ranks": float(t)})
        fused = 9.5 if scenario == "tie" else 4.0
        times = {"unfused": 10.0 + rank, "fused:one_shot": fused + rank}   # max over ranks: 11 / fused + 1
        if scenario == "host":                      # fast on the device, 50 us to issue (unfused: 30)
            times.update({"host:unfused": 30.0, "host:fused:one_shot": 50.0})
        return {c: times.get(c, math.inf) for c in (only or measure.candidates(key.op))}
    measure.measure_key = stub

    model = toy_model(RowParallelResidualNorm)
    x, res = toy_inputs(rank=rank)
    with torch.no_grad():
        want = model(x, res)
    if scenario == "dynamic":                       # M unknown while compiling
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(res, 0)
    rep = tdcompile.explain(model, x, res, options={"strategy": "auto"})
    err = max((a - b).abs().max().item() for a, b in zip(rep.output, want))
    rep2 = tdcompile.explain(model, x, res, options={"strategy": "auto"})   # the same process again
    graphed = {}
    if scenario == "host":                          # the same graph, decided for a CUDA-graph replay
        from tdcompile.config import cuda_graphed
        with cuda_graphed():
            g = tdcompile.explain(model, x, res, options={"strategy": "auto"})
        o = tdcompile.explain(model, x, res, options={"strategy": "auto", "cuda_graphs": True})
        graphed = {k: sorted(f"{d.pattern}={d.choice}" for d in r.matches) for k, r in (("block", g), ("option", o))}
    return {"graphed": graphed, "calls": calls, "uuid": backend.TdistPass(Options()).uuid(),
            "choices": sorted(f"{d.pattern}={d.choice}" for d in rep.matches),
            "times": {d.pattern: d.decision.candidates_us for d in rep.matches},
            "reasons": {d.pattern: d.decision.reason for d in rep.matches},
            "rewritten": any("tdist.gemm_all_reduce_rmsnorm" in after for _, after in rep.graphs),
            "choices2": sorted(f"{d.pattern}={d.choice}" for d in rep2.matches), "err": err}


def agreement_storm(n: int = 3000) -> dict:
    """``n`` agreements back to back with torch's Python dispatcher on, as the pass runs inside
    Inductor: plain ``dist.all_reduce`` calls deadlock here within a few hundred (the gloo worker
    thread waits for the GIL to free the previous call's tensors while the next call holds it)."""
    import time

    from torch._dispatch.python import enable_python_dispatcher

    from tdcompile import measured
    g, t0 = dist.group.WORLD.group_name, time.perf_counter()
    with enable_python_dispatcher():
        for i in range(n):
            assert measured.all_agree(True, g) and measured.max_over_ranks({"x": float(i)}, ["x"], g) == {"x": i}
    return {"calls": 2 * n, "s": time.perf_counter() - t0}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    r = main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
    print("RESULT " + json.dumps(r), flush=True)
    import gloo_ranks
    gloo_ranks.finish()
