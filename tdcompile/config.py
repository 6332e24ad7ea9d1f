"""Options of the ``tdist`` backend: ``torch.compile(m, backend="tdist", options={...})``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

STRATEGIES = ("auto", "fused", "unfused", "sequence_parallel")


@dataclass(frozen=True, kw_only=True)
class Options:
    strategy: str = "auto"
    """How matches are decided. ``"auto"``: the cost model picks, per match and shape, the
    fastest of unfused (NCCL + cuBLAS), the fused kernel, and -- for all-reduce regions --
    the sequence-parallel form; with no device profile (CPU) it keeps everything unfused.
    ``"fused"``: fuse every match. ``"unfused"``: rewrite nothing (plain Inductor).
    ``"sequence_parallel"``: turn every all_reduce region into reduce_scatter ... all_gather
    and fuse those into GEMM-ReduceScatter / AllGather-GEMM."""

    dump_dir: Optional[str] = None
    """If set, write the graphs before/after each stage (``rank{r}/graph{g}/NN.stage.py``)
    and the rewrite report there."""

    profile: Optional[str] = None
    """Device profile for the cost model: a shipped name (``"h100"``, ``"h200"``) or a JSON
    path written by ``tdcompile calibrate``. Default: the shipped profile matching the GPU
    in use, none on CPU."""

    min_sp_rows: int = 0
    """Sequence parallel needs at least this many rows (tokens) per graph; smaller graphs
    (decode of a few tokens) keep all_reduce. 0 = no limit."""

    @staticmethod
    def from_mapping(options: Optional[Mapping[str, Any]]) -> "Options":
        options = dict(options or {})
        valid = {f.name for f in dataclasses.fields(Options)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"tdist: unknown option(s) {unknown}; valid options are {sorted(valid)}")
        opts = Options(**options)
        if opts.strategy not in STRATEGIES:
            raise ValueError(f"tdist: strategy must be one of {STRATEGIES}, got {opts.strategy!r}")
        return opts
