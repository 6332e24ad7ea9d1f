"""One rank of the fuzzer's 2-rank gloo pool (started by ``tests/fuzz_pool.py``).

Reads one seed per line on stdin, runs that case (eager, then ``torch.compile(backend="tdist")``
with the case's strategy and dynamic setting) and writes one JSON line per seed on stdout:
``{"seed", "error", "max_diff", "rewritten", "patterns", "fallback"}``. Everything else the
process prints goes to stderr. ``python tests/fuzz_worker.py RANK PORT``.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")   # 2 ranks share 2 cores

import faulthandler  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from datetime import timedelta  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed._functional_collectives import AsyncCollectiveTensor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_programs  # noqa: E402

FALLBACK_TEXT = "tdist pass failed"


class _Watch(logging.Handler):
    """Collects, per case, the backend's fallback warnings and its rewrite reports."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.fallbacks, self.reports = [], []

    def emit(self, record):   # never raises: it runs inside the pass
        try:
            if record.levelno >= logging.WARNING and FALLBACK_TEXT in record.getMessage():
                self.fallbacks.append(record.getMessage()[:2000])
            for arg in record.args if isinstance(record.args, tuple) else ():
                if hasattr(arg, "matches"):
                    self.reports.append(arg)
        except Exception as e:  # noqa: BLE001
            self.fallbacks.append(f"log record could not be read: {type(e).__name__}: {e}")


def _plain(outs):
    return [o.wait() if isinstance(o, AsyncCollectiveTensor) else o for o in outs]


def run_case(seed: int, rank: int, watch: _Watch, strategy: str | None = None) -> dict:
    """``strategy`` overrides the case's; under ``"bound"`` (collectives become no-ops, the values
    are NOT valid) only the outputs' shapes and dtypes are compared."""
    watch.fallbacks, watch.reports = [], []
    faulthandler.dump_traceback_later(float(os.environ.get("TDIST_FUZZ_STACKS_S", "210")))   # hung: stacks to stderr
    res = {"seed": seed, "error": None, "max_diff": None, "rewritten": 0, "patterns": [], "fallback": []}
    try:
        case = fuzz_programs.make_case(seed)
        torch._dynamo.reset()
        model, inputs = fuzz_programs.build(case, rank)
        with torch.no_grad():
            want = _plain(model(*inputs))
            options = dict(case.options)
            if strategy:
                options["strategy"] = strategy
            if os.environ.get("TDIST_FUZZ_DUMP"):                 # replaying: keep the graphs of each stage
                options["dump_dir"] = os.path.join(os.environ["TDIST_FUZZ_DUMP"], str(seed))
            compiled = torch.compile(model, backend="tdist", options=options, dynamic=case.dynamic, fullgraph=True)
            got = _plain(compiled(*inputs))
        assert len(want) == len(got), f"{len(got)} outputs, eager has {len(want)}"
        diffs = []
        for i, (w, g) in enumerate(zip(want, got)):
            assert w.shape == g.shape, f"output {i}: shape {tuple(g.shape)}, eager {tuple(w.shape)}"
            assert w.dtype == g.dtype, f"output {i}: dtype {g.dtype}, eager {w.dtype}"
            if strategy == "bound":
                continue
            scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
            diffs.append(float((w - g).abs().max()) / scale if w.numel() else 0.0)
        res["max_diff"] = max(diffs, default=0.0)
        assert res["max_diff"] <= 1e-4, f"compiled differs from eager: max |diff| / scale = {res['max_diff']:.3g}"
    except Exception as e:  # reported to the test, which prints the seed and the program
        res["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
    try:   # the report of every graph must render (the CLI prints it)
        for rep in watch.reports:
            str(rep)
    except Exception as e:  # noqa: BLE001
        res["error"] = res["error"] or f"the rewrite report does not render: {type(e).__name__}: {e}"
    matches = [d for rep in watch.reports for d in rep.matches]
    res["rewritten"] = sum(bool(d.rewritten) for d in matches)
    res["patterns"] = sorted({d.pattern for d in matches if d.rewritten})
    res["fallback"] = watch.fallbacks
    faulthandler.cancel_dump_traceback_later()
    return res


def main(rank: int, port: int) -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                                       # stray prints go to stderr
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=fuzz_programs.WORLD, timeout=timedelta(seconds=60))
    fuzz_programs.GROUPS[:] = [dist.group.WORLD, dist.new_group(list(range(fuzz_programs.WORLD)))]
    torch._inductor.config.fx_graph_cache = False        # the pass must run for every case,
    torch._functorch.config.enable_autograd_cache = False  # not be skipped by a cache hit
    watch = _Watch()
    logger = logging.getLogger("tdcompile")
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    print(json.dumps({"ready": rank}), file=out, flush=True)
    for line in sys.stdin:
        if line.strip():
            seed, *strategy = line.split()                   # "SEED" or "SEED STRATEGY"
            print(json.dumps(run_case(int(seed), rank, watch, *strategy)), file=out, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
