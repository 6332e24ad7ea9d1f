"""Shared helpers of the simulated-rank GPU tests: one ``SimWorld`` per world size (W ranks =
W buffers + W streams on one GPU, see ``tdcompile.kernels.symm``) and NaN-poisoned outputs."""
import torch

_WORLDS: dict = {}


def world(W: int, tag: str = ""):
    """The process-wide simulated world of ``W`` ranks (created on first use); ``tag`` keeps a
    separate one, e.g. per kernel, so a kernel whose test breaks its world breaks no other."""
    from tdcompile.kernels.symm import SimWorld
    if (W, tag) not in _WORLDS:
        _WORLDS[(W, tag)] = SimWorld(W)
    return _WORLDS[(W, tag)]


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN so an element the kernel never wrote fails the comparison."""
    return t.fill_(float("nan"))


def warm_streams(sim, dtype) -> None:
    """cuBLAS allocates a workspace per stream on its first GEMM there: do that on every simulated
    rank's main and side stream now, not while a peer's wait kernel spins."""
    x = torch.ones(8, 8, device="cuda", dtype=dtype)
    for s in sim.streams + [w.side for w in sim.ws]:
        with torch.cuda.stream(s):
            torch.mm(x, x)
    torch.cuda.synchronize()


def capture_and_replay(sim, body, outs: list, times: int = 20) -> "torch.cuda.CUDAGraph":
    """``body()`` (which sets ``outs``) run once, then captured in a CUDA graph and replayed
    ``times`` times with every output NaN-poisoned before each replay; ``sim.check()`` after
    both. Returns the graph (for replays on new inputs)."""
    body()
    sim.check()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    for _ in range(times):
        for o in outs:
            poison(o)
        g.replay()
    sim.check()
    return g
