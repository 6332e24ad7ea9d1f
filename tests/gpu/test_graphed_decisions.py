"""A function captured by ``engine.Graphed`` is compiled inside ``config.cuda_graphed()``, so
``auto`` decides its graphs for a CUDA-graph replay (device time only, ``Options.cuda_graphs``
None); the capture itself and later un-graphed calls are outside it."""
import pytest
import torch

from tdcompile.config import in_cuda_graphed
from tdcompile.engine import Graphed

pytestmark = pytest.mark.gpu


def test_graphed_warm_up_calls_run_inside_the_graphed_block_and_nothing_else_does():
    seen = []

    def step(x):                                   # [4] -> [4]
        seen.append(in_cuda_graphed())
        return x * 2

    g = Graphed(step, torch.ones(4, device="cuda"), warmup=3)
    assert seen == [True, True, True, False]      # 3 warm-ups (where compiles happen), then the capture
    assert torch.equal(g.run(torch.full((4,), 3.0, device="cuda")), torch.full((4,), 6.0, device="cuda"))
    assert not in_cuda_graphed()
