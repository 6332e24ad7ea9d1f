"""Options of the ``tdist`` backend and the one vocabulary a decision travels in.

A decision goes, with the same names all the way, from the user's option to a kernel::

    Options.strategy          "auto" | an IMPL family | "sequence_parallel" | "bound"
      -> Decision.choice      an IMPL ("unfused", "fused", "symm_mem", "fused:one_shot", ...)
                              or "auto" (decided at run time from the measured table)
        -> tdist op's ``impl`` argument   (same string, kept in the graph so dumps show it)
          -> ops/cuda.py runs the family's implementation (and the variant, if any)

An IMPL is ``family`` or ``family:variant``:

* ``unfused``  -- exactly what Inductor runs: NCCL collective + cuBLAS GEMM.
* ``fused``    -- tdcompile's Triton kernels over symmetric memory.
* ``symm_mem`` -- torch's symmetric-memory ops (``torch.distributed._symmetric_memory``),
  where the installed torch has them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Optional

FAMILIES = ("unfused", "fused", "symm_mem")
"""Implementation families of a ``tdist`` op (see the module docstring)."""
STRATEGIES = ("auto", *FAMILIES, "sequence_parallel", "bound")
SP_CHOICES = ("auto", "always", "never")
"""Values of ``Options.strategy``."""


def family(impl: str) -> str:
    """``"fused:one_shot"`` -> ``"fused"``."""
    return impl.split(":", 1)[0]


def variant(impl: str) -> Optional[str]:
    """``"fused:one_shot"`` -> ``"one_shot"``; ``"fused"`` -> None."""
    return impl.split(":", 1)[1] if ":" in impl else None


def check_impl(impl: str) -> None:
    """Raise ``ValueError`` unless ``impl`` is ``"auto"`` or ``family[:variant]`` of a known family."""
    if impl != "auto" and family(impl) not in FAMILIES:
        raise ValueError(f"tdist: impl must be 'auto' or one of {FAMILIES} (optionally ':variant'), got {impl!r}")


@dataclass(frozen=True, kw_only=True)
class Options:
    strategy: str = "auto"
    """How matches are decided. ``"auto"``: per match and shape, the fastest candidate in the
    measured table (unfused, every tdist kernel variant, torch symmetric memory), unfused
    winning unless beaten by more than ``measured.tie(M)`` (15%; 10% under CUDA graphs; 8% at decode sizes), each call
    costed at max(device, host time) unless the graph is CUDA-graphed (``cuda_graphs``); a shape
    not yet measured is measured while compiling
    on the GPU (all ranks together); without a GPU the fitted analytic model predicts, or, with no profile,
    everything stays unfused. ``"unfused"``: rewrite nothing (plain Inductor). ``"fused"`` /
    ``"symm_mem"``: force that family on every match. ``"sequence_parallel"``: turn every
    all_reduce region into reduce_scatter ... all_gather and fuse those. ``"bound"``: replace
    every collective with a no-op of the same shape -- a timing bound, NOT a valid output."""

    dump_dir: Optional[str] = None
    """If set, write the graphs before/after each stage (``rank{r}/graph{g}/NN.stage.py``)
    and the rewrite report there."""

    profile: Optional[str] = None
    """Device profile: a shipped name (``"h100"``, ``"h200"``) or a JSON path written by
    ``tdcompile calibrate``. It names the measured table ``auto`` decides from and the analytic
    model's constants. Default: the one matching the GPU in use, none on CPU."""

    min_sp_rows: int = 0
    """Sequence parallel needs at least this many rows (tokens) per graph; smaller graphs
    (decode of a few tokens) keep all_reduce. 0 = no limit."""

    sequence_parallel: str = "auto"
    """Whether a graph's all_reduce regions become reduce_scatter ... all_gather (the form, apart
    from how each match then runs): ``"auto"`` -- by measurement on a GPU, by the analytic model
    without one, always under ``strategy="sequence_parallel"``; ``"always"`` -- wherever possible,
    each match still decided by ``strategy`` (e.g. ``auto``: measured); ``"never"``. Ignored by
    ``strategy="unfused"`` (nothing is rewritten) and ``"bound"``."""

    margin: Optional[float] = None
    """The fraction by which a measured candidate must beat ``unfused`` to be chosen under
    ``auto`` while compiling on a GPU, at every M, and by which the sequence-parallel form must
    beat the all_reduce form. None: ``measured.tie(M)``, the default margins that measurements
    have supported end to end. An experiment knob (bench column ``tdist:margin<percent>``)."""

    cuda_graphs: Optional[bool] = None
    """Whether the compiled graphs are replayed in CUDA graphs. True: ``auto`` compares device
    times only. False: it compares the larger of each candidate's device and host time per call
    (``measured.effective``: an un-graphed call cannot end before it is issued). None:
    True for graphs first compiled inside ``cuda_graphed()`` (``Engine``'s decode steps, anything
    ``engine.Graphed`` captures), else False."""

    @staticmethod
    def from_mapping(options: Optional[Mapping[str, Any]]) -> "Options":
        """Validate ``options`` (the dict given to ``torch.compile``) and build ``Options``."""
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TypeError(f"tdist: options must be a dict such as {{'strategy': 'auto'}}, "
                            f"got {type(options).__name__} {options!r}")
        valid = [f.name for f in dataclasses.fields(Options)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"tdist: unknown option(s) {unknown}; valid options are {valid}")
        o = dict(options)
        if not isinstance(o.get("strategy", "auto"), str) or o.get("strategy", "auto") not in STRATEGIES:
            raise ValueError(f"tdist: option 'strategy' must be one of {STRATEGIES}, got {o.get('strategy')!r}")
        for name in ("dump_dir", "profile"):
            if o.get(name) is not None and not isinstance(o[name], (str, os.PathLike)):
                raise TypeError(f"tdist: option {name!r} must be a path string or None, got {o[name]!r}")
            if o.get(name) is not None:
                o[name] = os.fspath(o[name])
        if o.get("sequence_parallel", "auto") not in SP_CHOICES:
            raise ValueError(f"tdist: option 'sequence_parallel' must be one of {SP_CHOICES}, "
                             f"got {o.get('sequence_parallel')!r}")
        rows = o.get("min_sp_rows", 0)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"tdist: option 'min_sp_rows' must be an int >= 0, got {rows!r}")
        if o.get("cuda_graphs") is not None and not isinstance(o["cuda_graphs"], bool):
            raise ValueError(f"tdist: option 'cuda_graphs' must be None, True or False, got {o['cuda_graphs']!r}")
        margin = o.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not 0 <= margin < 0.5):
            raise ValueError(f"tdist: option 'margin' must be None or a fraction in [0, 0.5), got {margin!r}")
        if o.get("profile") is not None:
            from tdcompile.cost_model import DeviceProfile
            DeviceProfile.load(o["profile"])        # raises ValueError naming the shipped profiles
        return Options(**o)


_GRAPHED = threading.local()


@contextlib.contextmanager
def cuda_graphed():
    """Graphs compiled inside this block will be replayed in CUDA graphs (``Options.cuda_graphs``
    None): wrap the warm-up call that compiles a function you then capture."""
    _GRAPHED.depth = getattr(_GRAPHED, "depth", 0) + 1
    try:
        yield
    finally:
        _GRAPHED.depth -= 1


def in_cuda_graphed() -> bool:
    """Whether the current thread is inside ``cuda_graphed()``."""
    return getattr(_GRAPHED, "depth", 0) > 0
