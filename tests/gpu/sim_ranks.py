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
