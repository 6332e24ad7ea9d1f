"""The ``tdist`` backend: the whole pipeline in one place.

    Dynamo FX graph
      -> AOT (inference) -> post-grad ATen graph          (Inductor's compile_fx)
      -> TdistPass, installed as Inductor's ``post_grad_custom_post_pass``:
           00 input        the post-grad graph as Inductor hands it over
           01 normalize    view/_unsafe_view -> reshape, fold HF's in-place copy
           02 sequence_parallel   all_reduce regions -> reduce_scatter ... all_gather
                           (strategy "sequence_parallel", or "auto" when predicted faster)
           03 match        find gemm_all_reduce / all_gather_gemm / gemm_reduce_scatter /
                           all_reduce; the cost model decides each
           04 rewrite      replace the chosen ones with torch.ops.tdist.*
      -> Inductor lowers everything else

``TdistPass.uuid()`` hashes the pass sources, the options and the device profile, so
Inductor's FX-graph cache never serves a graph rewritten under other settings.
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import tdcompile.ops  # noqa: F401  (registers torch.ops.tdist.*)
from tdcompile import cost_model
from tdcompile.config import Options
from tdcompile.passes import sequence_parallel
from tdcompile.passes.all_gather_gemm import find_all_gather_gemm_matches
from tdcompile.passes.all_reduce import find_all_reduce_matches
from tdcompile.passes.gemm_reduce_scatter import find_gemm_reduce_scatter_matches
from tdcompile.passes.match import Decided
from tdcompile.passes.normalize import normalize
from tdcompile.report import Report

log = logging.getLogger("tdcompile")
_graph_ids = itertools.count()
_sinks: list[Report] = []  # reports being filled by tdcompile.explain()


class TdistPass(CustomGraphPass):
    def __init__(self, options: Options):
        self.options = options
        self.profile = cost_model.DeviceProfile.load(options.profile) if options.profile else \
            cost_model.profile_for_device()

    def __call__(self, graph: fx.Graph) -> None:
        gid, opts = next(_graph_ids), self.options
        before = self._dump(graph, gid, "00.input")
        normalize(graph)
        self._dump(graph, gid, "01.normalize.after")
        sp = sequence_parallel.decide(graph, opts, self.profile)
        if sp.choice == "sequence_parallel":
            sequence_parallel.rewrite(graph)
            self._dump(graph, gid, "02.sequence_parallel.after")

        matches = (find_all_gather_gemm_matches(graph) + find_gemm_reduce_scatter_matches(graph)
                   + find_all_reduce_matches(graph))
        decided = []
        for m in matches:
            mm, n, k = m.mnk()
            decision = cost_model.decide(m.pattern, m=mm, n=n, k=k, world_size=m.world_size, dtype=m.dtype,
                                         strategy=opts.strategy, profile=self.profile)
            decided.append(Decided(m, decision, graph_id=gid))
        report = Report(matches=decided, graph_decisions=[(gid, sp)])
        self._dump_text(gid, "03.match.txt", str(report))

        for d in decided:
            if d.choice != "unfused":
                d.match.replace_with(graph, impl=d.choice)
                d.rewritten = True
        graph.lint()
        after = self._dump(graph, gid, "04.rewrite.after")
        log.info("tdist graph %d:\n%s", gid, report)
        for sink in _sinks:
            sink.matches.extend(decided)
            sink.graph_decisions.append((gid, sp))
            sink.graphs.append((before, after))

    def uuid(self) -> Optional[str]:
        here = os.path.dirname(__file__)
        files = [os.path.join(here, "passes", f) for f in sorted(os.listdir(os.path.join(here, "passes")))
                 if f.endswith(".py")]
        files += [os.path.join(here, f) for f in ("backend.py", "cost_model.py", "ops/library.py")]
        h = get_hash_for_files(tuple(files)).hex()
        return f"{h}-{self.options!r}-{self.profile!r}"

    # ------------------------------------------------------------------ dumps
    def _dir(self, gid: int) -> Optional[str]:
        if not self.options.dump_dir:
            return None
        rank = dist.get_rank() if dist.is_initialized() else 0
        d = os.path.join(self.options.dump_dir, f"rank{rank}", f"graph{gid}")
        os.makedirs(d, exist_ok=True)
        return d

    def _dump(self, graph: fx.Graph, gid: int, stage: str) -> str:
        code = graph.python_code("self").src if (self.options.dump_dir or _sinks) else ""
        d = self._dir(gid)
        if d:
            with open(os.path.join(d, f"{stage}.py"), "w") as f:
                f.write(code)
        return code

    def _dump_text(self, gid: int, name: str, text: str) -> None:
        d = self._dir(gid)
        if d:
            with open(os.path.join(d, name), "w") as f:
                f.write(text + "\n")


def tdist_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None):
    """``torch.compile(model, backend="tdist", options={...})``."""
    from torch._inductor.compile_fx import compile_fx

    opts = Options.from_mapping(options)
    patches = {"post_grad_custom_post_pass": TdistPass(opts)}
    if _sinks or opts.dump_dir:
        patches["force_disable_caches"] = True  # the pass must run to fill reports and dumps
    return compile_fx(gm, example_inputs, config_patches=patches)


def register() -> None:
    """Make ``backend="tdist"`` resolvable. When the package is installed, torch finds it
    through the ``torch_dynamo_backends`` entry point (and registers it itself, so we must
    not); when it is only importable (source tree on PYTHONPATH) we register it here."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "tdist" in _COMPILER_FNS or "tdist" in entry_points(group="torch_dynamo_backends").names:
        return
    register_backend(tdist_backend, name="tdist")
