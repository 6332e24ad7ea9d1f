"""The base of every match: where it is, its GEMM shape, the cost-model decision, and
``replace_with`` (implemented per fusion family)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from tdcompile.cost_model import Decision
from tdcompile.passes.graph_utils import Gemm, concrete  # noqa: F401  (Gemm: annotation)


@dataclass
class Match:
    pattern: str = field(init=False)
    """``"gemm_all_reduce"`` | ``"all_gather_gemm"`` | ``"gemm_reduce_scatter"`` | ``"all_reduce"``."""
    module: str
    """Module path from ``nn_module_stack``, e.g. ``model.layers.0.mlp.down_proj``."""
    group_name: str
    world_size: int
    dtype: torch.dtype

    def mnk(self) -> tuple[Optional[int], int, int]:
        """(M, N, K) for the cost model; M None when dynamic, N summed over several weights."""
        raise NotImplementedError

    def replace_with(self, graph: fx.Graph, impl: str) -> None:
        """Rewrite the matched subgraph into the ``tdist`` op with ``impl``."""
        raise NotImplementedError

    def describe(self) -> str:
        """Extra detail for the report (e.g. the list of weights)."""
        return ""


@dataclass
class SingleGemmMatch(Match):
    """A collective fed by one GEMM (through the reshape ``chain``): M, N, K are that GEMM's."""
    gemm: "Gemm"
    chain: list

    def mnk(self):
        m, n, k = self.gemm.mnk
        return concrete(m), n, k


@dataclass
class Decided:
    """A match plus what the cost model chose for it (one row of the report)."""
    match: Match
    decision: Decision
    graph_id: int = 0
    rewritten: bool = False

    pattern = property(lambda self: self.match.pattern)
    module = property(lambda self: self.match.module)
    shape = property(lambda self: self.match.mnk())
    choice = property(lambda self: self.decision.choice)
    predicted_us = property(lambda self: self.decision.predicted_us)
    reason = property(lambda self: self.decision.reason)
