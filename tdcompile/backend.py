"""The ``tdist`` backend: the whole pipeline in one place.

    Dynamo FX graph
      -> AOT (inference) -> post-grad ATen graph          (Inductor's compile_fx)
      -> TdistPass, installed as Inductor's ``post_grad_custom_post_pass``:
           00 input        the post-grad graph as Inductor hands it over
           01 normalize    view/_unsafe_view -> reshape, fold HF's in-place copy
           02 sequence_parallel   all_reduce regions -> reduce_scatter ... all_gather
                           (strategy "sequence_parallel"; "auto" only off-GPU, when predicted faster)
           03 match        find all_reduce_rmsnorm (all_reduce -> + residual -> RMSNorm; with the
                           GEMM before it: gemm_all_reduce_rmsnorm), then
                           gemm_all_reduce / all_gather_gemm / gemm_reduce_scatter /
                           all_reduce on what is left; each is decided: on a GPU from the
                           measured table (decide_measured), a missing or stale key measured
                           right here, all ranks together; off-GPU from the analytic model
           04 rewrite      replace the chosen ones with torch.ops.tdist.*
           (strategy "bound": 04 replaces every collective with a no-op -- timing only)
      If any stage raises, the graph is restored and compiled unrewritten (a warning says why).
      -> Inductor lowers everything else

``TdistPass.uuid()`` hashes the pass sources, the options and the device profile, so
Inductor's FX-graph cache never serves a graph rewritten under other settings; under ``auto`` on
a GPU it is None (no caching), since the pass agrees its decisions with the other ranks.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import tdcompile.ops  # noqa: F401  (registers torch.ops.tdist.*)
from tdcompile import cost_model
from tdcompile.config import Options, in_cuda_graphed
from tdcompile import measured
from tdcompile.cost_model import Decision
from tdcompile.passes import bound, sequence_parallel
from tdcompile.passes.all_gather_gemm import find_all_gather_gemm_matches
from tdcompile.passes.all_reduce_rmsnorm import find_all_reduce_rmsnorm_matches
from tdcompile.passes.all_reduce import find_all_reduce_matches
from tdcompile.passes.gemm_all_reduce_rmsnorm import find_gemm_all_reduce_rmsnorm_matches
from tdcompile.passes.gemm_reduce_scatter import find_gemm_reduce_scatter_matches
from tdcompile.passes.match import Decided
from tdcompile.claims import one_claim_per_all_reduce, rmsnorm_savings
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
        """Run the pipeline; if anything in it raises, the graph goes to Inductor unrewritten
        (a warning names the stage and the error): a failing pass never fails the compile."""
        gid = next(_graph_ids)
        snapshot = fx.Graph()
        snapshot.output(snapshot.graph_copy(graph, {}))          # shallow-meta copy of every node
        stage = ["00 input"]
        try:
            if not self._run(graph, gid, stage):
                # nothing decided: Inductor gets exactly the graph it handed over (normalize's
                # edits undone), so an all-unfused tdist compiles to the same code as Inductor
                _restore(graph, snapshot)
        except Exception as e:  # noqa: BLE001
            _restore(graph, snapshot)
            msg = f"tdist pass failed at stage {stage[0]!r} of graph {gid} ({type(e).__name__}: {e}); " \
                  "compiling the graph unrewritten"
            log.warning(msg, exc_info=log.isEnabledFor(logging.DEBUG))
            for sink in _sinks:
                sink.errors.append(msg)

    def _run(self, graph: fx.Graph, gid: int, stage: list) -> bool:
        """The pipeline; returns whether it rewrote anything (False: the caller restores the input)."""
        opts = self.options
        before = self._dump(graph, gid, "00.input")
        stage[0] = "01 normalize"
        normalize(graph)
        self._dump(graph, gid, "01.normalize.after")
        if opts.strategy == "bound":
            stage[0] = "04 bound"
            n = bound.replace_collectives(graph)
            graph.lint()
            log.warning("tdist graph %d: strategy='bound' replaced %d collectives with no-ops: timing only, "
                        "the output is NOT valid", gid, n)
            after = self._dump(graph, gid, "04.bound.after")
            for sink in _sinks:
                sink.graphs.append((before, after))
            return True
        stage[0] = "02 sequence_parallel"
        on_gpu = _on_gpu()
        graphed = opts.cuda_graphs if opts.cuda_graphs is not None else in_cuda_graphed()

        def decide(m, may_measure: bool = True) -> Decided:
            mm, n, k = m.mnk()
            if on_gpu and opts.strategy == "auto" and mm is not None:
                return Decided(m, decide_measured(m, may_measure, opts.margin, not graphed), graph_id=gid)
            table = measured.table(m.world_size) if on_gpu else None
            d = cost_model.decide(m.pattern, m=mm, n=n, k=k, world_size=m.world_size, dtype=m.dtype,
                                  strategy=opts.strategy, profile=self.profile, table=table)
            if d.choice == "auto" and m.pattern not in RUNTIME_AUTO:
                d = Decision("unfused", {}, f"dynamic M: the op's NCCL fallback for {m.pattern} is slower than "
                                            "Inductor's own code, so it is not left to a run-time choice")
            return Decided(m, d, graph_id=gid)

        if opts.sequence_parallel == "never" or opts.strategy == "unfused":
            sp = Decision("all_reduce", {}, f"sequence_parallel={opts.sequence_parallel!r}, "
                                            f"strategy={opts.strategy!r}")
        elif opts.sequence_parallel == "always":      # the form forced; each match decided by strategy
            sp = sequence_parallel.decide(graph, dataclasses.replace(opts, strategy="sequence_parallel"), None)
            if sp.choice == "sequence_parallel":
                sp = Decision(sp.choice, {}, "sequence_parallel='always'")
        elif on_gpu and opts.strategy == "auto":
            sp = measured_sequence_parallel(graph, opts, decide)
        else:
            sp = sequence_parallel.decide(graph, opts, self.profile)
        if sp.choice == "sequence_parallel":
            sequence_parallel.rewrite(graph)
            self._dump(graph, gid, "02.sequence_parallel.after")

        stage[0] = "03 match"

        rms_matches = find_all_reduce_rmsnorm_matches(graph)
        rms = [decide(m) for m in rms_matches + find_gemm_all_reduce_rmsnorm_matches(rms_matches)]
        others = [decide(m) for m in _graph_matches(graph)]
        decided = one_claim_per_all_reduce(rms, others)
        report = Report(matches=decided, graph_decisions=[(gid, sp)])
        self._dump_text(gid, "03.match.txt", str(report))

        stage[0] = "04 rewrite"
        changed = sp.choice == "sequence_parallel"
        for d in decided:
            if d.choice != "unfused":
                d.match.replace_with(graph, impl=d.choice)
                d.rewritten = changed = True
        graph.lint()
        after = self._dump(graph, gid, "04.rewrite.after")
        log.info("tdist graph %d:\n%s", gid, report)
        for sink in _sinks:
            sink.matches.extend(decided)
            sink.graph_decisions.append((gid, sp))
            sink.graphs.append((before, after if changed else before))
        return changed

    def uuid(self) -> Optional[str]:
        """A hash of everything that decides the rewrite, for Inductor's caches; None (no caching)
        under ``auto`` on a GPU, where the pass agrees its decisions with the other ranks while
        compiling -- a rank served from a cache would not join (``decide_measured``)."""
        if self.options.strategy == "auto" and _on_gpu():
            return None
        here = os.path.dirname(__file__)
        files = [os.path.join(here, "passes", f) for f in sorted(os.listdir(os.path.join(here, "passes")))
                 if f.endswith(".py")]
        files += [os.path.join(here, f) for f in ("backend.py", "claims.py", "cost_model.py", "measured.py",
                                                 "config.py", "ops/library.py")]
        h = get_hash_for_files(tuple(files)).hex()
        return f"{h}-{self.options!r}-{self.profile!r}-{_table_digest()}"

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


def _graph_matches(graph: fx.Graph) -> list:
    return (find_all_gather_gemm_matches(graph) + find_gemm_reduce_scatter_matches(graph)
            + find_all_reduce_matches(graph))


def measured_sequence_parallel(graph: fx.Graph, opts: Options, decide, gemm_us=None) -> Decision:
    """Sequence parallel on a GPU under ``auto``: only when the measured table says so.

    Both forms of the graph are costed from the table: every match's time under its decided
    impl, summed, for the graph as it is and after the sequence-parallel rewrite (on a copy).
    An all_gather_gemm of the SP form also holds GEMMs (q/k/v, gate/up) that the other form runs
    outside any match, so their time alone (``gemm_us(match, may_measure)``: the measured ``gemm``
    key, cuBLAS without the gather) is taken off: what is compared is the communication each form
    adds. A match (or such a GEMM) not in the table makes the comparison impossible: all_reduce
    stays. An all-reduce that an RMSNorm fusion claims saves more than its GEMM/all-reduce match
    says (``rmsnorm_savings``): that is taken off the all_reduce form. The rest of the graph
    (row-local ops on 1/W of the rows under SP) is not counted, which only favours keeping
    all_reduce."""
    import copy

    try:
        possible = sequence_parallel.decide(graph, dataclasses.replace(opts, strategy="sequence_parallel"), None)
    except Exception as e:  # noqa: BLE001
        return Decision("all_reduce", {}, f"sequence parallel not applicable ({type(e).__name__}: {e})")
    if possible.choice != "sequence_parallel":
        return possible

    gemm_us = gemm_us or _measured_gemm_us

    def total(g, may_measure):
        t, others = 0.0, []
        for m in _graph_matches(g):
            d = decide(m, may_measure)
            if d.choice not in d.decision.candidates_us:
                return None, m
            t += d.decision.candidates_us[d.choice]
            others.append(d)
            if m.pattern == "all_gather_gemm":      # its GEMMs: outside every match of the other form
                alone = gemm_us(m, may_measure)
                if alone is None:
                    return None, m
                t -= alone
        rms = find_all_reduce_rmsnorm_matches(g)    # the all_reduce form's norm fusions (none under SP)
        t -= rmsnorm_savings([decide(m, may_measure) for m in rms + find_gemm_all_reduce_rmsnorm_matches(rms)],
                             others)
        return t, None

    base, miss = total(graph, True)
    if base is None:
        return Decision("all_reduce", {}, f"sequence parallel not compared: {miss.pattern} M,N,K={miss.mnk()} is not "
                                          "in the measured table yet: keeping all_reduce")
    try:   # costing a hypothetical graph must never cost the fusions of the real one
        sp_graph = copy.deepcopy(graph)
        sequence_parallel.rewrite(sp_graph)
        sp_t, sp_miss = total(sp_graph, False)    # a hypothetical graph's keys: never measured here
    except Exception as e:  # noqa: BLE001
        return Decision("all_reduce", {}, f"sequence parallel could not be costed ({type(e).__name__}: {e}): "
                                          "keeping all_reduce")
    if sp_t is None:
        m = sp_miss
        return Decision("all_reduce", {}, f"sequence parallel not measured ({m.pattern} M,N,K={m.mnk()} is not in the "
                                          "measured table, or its GEMM alone; `tdcompile calibrate --sp` measures "
                                          "them): keeping all_reduce")
    times = {"all_reduce": round(base, 1), "sequence_parallel": round(sp_t, 1)}
    margin = measured.TIE if opts.margin is None else opts.margin
    if sp_t < base * (1 - margin):
        return Decision("sequence_parallel", times, f"measured matches {base / sp_t:.2f}x faster with sequence "
                                                    "parallel", source="measured table")
    return Decision("all_reduce", times, f"sequence parallel not measured more than {margin:.0%} faster",
                    source="measured table")


def _measured_gemm_us(m, may_measure: bool) -> Optional[float]:
    """Microseconds of an all_gather_gemm match's GEMM alone (the ``gemm`` key: cuBLAS, no
    gather), agreed by every rank (a collective; inside a CUDA-graph capture the local table
    only); None when not measured."""
    mm, n, k = m.mnk()
    times, _, _ = _agreed_times(measured.Key.of("gemm", m=mm, n=n, k=k, dtype=m.dtype, world=m.world_size),
                                m, may_measure)
    t = (times or {}).get("unfused")
    return t if t is not None and math.isfinite(t) else None


def _on_gpu() -> bool:
    """Whether ``auto`` decides from measurements (a GPU) rather than the analytic model."""
    return torch.cuda.is_available()


RUNTIME_AUTO = ("all_reduce", "gemm_all_reduce")
"""Patterns a dynamic-M match may leave to the op (``impl="auto"``, chosen per M bucket at run time):
those whose run-time ``unfused`` path is the code Inductor would run (NCCL on the GEMM's own output).
Others (``all_reduce_rmsnorm``, ``gemm_all_reduce_rmsnorm``: Inductor fuses add + RMSNorm into one
kernel) stay unrewritten."""


def decide_measured(m, may_measure: bool = True, margin: Optional[float] = None,
                    charge_host: bool = True) -> Decision:
    """The decision of a static-M match on a GPU under ``auto``, made while compiling and agreed by
    every rank (a collective per key and process): the measured table's entry; a key missing from
    it, or measured with code changed since, is measured now, all ranks together
    (``may_measure=False``: kept unfused instead); ``margin``: ``Options.margin``; ``charge_host``:
    the graph runs un-graphed, so a call costs at least its host time (``measured.effective``; the
    decision's ``candidates_us`` are those effective times). Never ``"auto"``: a graph either runs a
    candidate that won a measurement or Inductor's own code.

    Every rank runs this pass because ``TdistPass.uuid()`` keeps such compiles out of Inductor's
    caches (a rank served from a cache would skip the collective the others wait in). Inside a
    CUDA-graph capture no collective can run: the local table decides, and a miss stays unfused."""
    from tdcompile import measure
    mm, n, k = m.mnk()
    key = measured.Key.of(m.pattern, m=mm, n=n, k=k, dtype=m.dtype, world=m.world_size)
    cands = measure.candidates(m.pattern)
    times, source, capturing = _agreed_times(key, m, may_measure)
    if times is None or "unfused" not in times:
        why = "first compiled inside a CUDA-graph capture" if capturing else "not measured for this costing"
        return Decision("unfused", {}, f"{key.id()} is not in the measured table ({why}): keeping Inductor's code")
    mine = {c: t for c, t in times.items() if c in cands}              # cands: unfused and host entries too
    eff = measured.effective(mine, charge_host)
    choice, why = measured.choose(eff, key.m, margin, charge_host)
    if eff != measured.device_times(mine):
        why += " (un-graphed: the larger of device and host time per call)"
    return Decision(choice, {c: round(t, 1) for c, t in eff.items()}, why, source=source)


def _agreed_times(key: measured.Key, m, may_measure: bool) -> tuple:
    """``(times, source, capturing)`` of ``key`` for match ``m``: agreed by every rank and measured
    if missing or stale (a collective; ``may_measure=False``: look up only), or, inside a
    CUDA-graph capture where no collective can run, the local table's entry (None on a miss)."""
    from torch._dispatch.python import no_python_dispatcher
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from tdcompile import measure
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        hit = measured.table(m.world_size).lookup(key)
        return (hit[0], hit[1], True) if hit is not None else (None, "", True)
    # real tensors, even inside Inductor's tracing; and the ops measured as they run in the compiled
    # program, without the Python dispatcher Inductor compiles under (its host time is not theirs)
    with unset_fake_temporarily(), no_python_dispatcher(), torch.no_grad():
        times, source = measure.agreed(key, m.group_name, may_measure=may_measure)
    return times, source, False


def _table_digest() -> str:
    """What the measured tables decide (they change decisions, so they key Inductor's cache)."""
    import hashlib
    if not torch.cuda.is_available():
        return "no-gpu"
    if dist.is_initialized():
        measured.table(dist.get_world_size())
    h = hashlib.sha256()
    for w, t in sorted(measured._TABLES.items()):
        for kid in sorted(t.entries):
            m = measured.Key.parse(kid).m
            picks = [measured.choose(t.entries[kid], m, charge_host=c)[0] for c in (True, False)]
            h.update(f"{w}:{kid}:{picks};".encode())
    return h.hexdigest()[:16]


def _restore(graph: fx.Graph, snapshot: fx.Graph) -> None:
    """Put ``snapshot``'s nodes back into ``graph`` (in place: Inductor holds ``graph``)."""
    for node in reversed(list(graph.nodes)):
        graph.erase_node(node)
    if hasattr(fx.graph, "_Namespace") and hasattr(graph, "_graph_namespace"):
        graph._graph_namespace = fx.graph._Namespace()     # the nodes get their old names back
    graph.output(graph.graph_copy(snapshot, {}))


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
