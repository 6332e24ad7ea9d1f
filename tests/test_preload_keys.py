"""``kernels.tiles.preload`` compiles AND loads every kernel variant an op will launch before
anything waits on a peer; a variant it wrongly thinks loaded is compiled at its first launch,
with a peer spinning (the hazard behind the W=4 two-shot Lamport test timeouts, 2026-11-27).
These checks run on a CPU: the kernel is a recorder standing in for a Triton JITFunction."""
import pytest
import torch

from tdcompile.kernels import tiles


class Recorder:
    """Records ``warmup`` calls; returns an object with ``_init_handles`` like a CompiledKernel."""

    def __init__(self):
        self.calls = []

    def warmup(self, *args, grid, **kwargs):
        self.calls.append(kwargs)
        return type("Compiled", (), {"_init_handles": lambda self: None})()


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tiles, "_LOADED", set())
    return Recorder()


def test_every_constexpr_value_is_its_own_variant(kernel):
    x = torch.zeros(64, dtype=torch.bfloat16)
    for nw in (4, 8, 16):                 # 4 and 8 (and BLOCK 1024 / 2048) once shared a key
        tiles.preload(kernel, (1,), x, 64, BLOCK=nw * 256, num_warps=nw, EVEN=True)
    assert [c["num_warps"] for c in kernel.calls] == [4, 8, 16]


def test_same_variant_is_compiled_once(kernel):
    x, y = torch.zeros(64, dtype=torch.bfloat16), torch.zeros(128, dtype=torch.bfloat16)
    tiles.preload(kernel, (1,), x, 64, BLOCK=1024, num_warps=4)
    tiles.preload(kernel, (2,), y, 128, BLOCK=1024, num_warps=4)    # same dtype, alignment, int classes
    assert len(kernel.calls) == 1


def test_runtime_specialisations_are_variants(kernel):
    x = torch.zeros(64, dtype=torch.bfloat16)
    tiles.preload(kernel, (1,), x, 64, BLOCK=1024)
    tiles.preload(kernel, (1,), x, 1, BLOCK=1024)          # an int equal to 1 specialises
    tiles.preload(kernel, (1,), x, 63, BLOCK=1024)         # not a multiple of 16
    tiles.preload(kernel, (1,), x[1:], 64, BLOCK=1024)     # pointer not 16-byte aligned
    tiles.preload(kernel, (1,), x.half(), 64, BLOCK=1024)  # another dtype
    assert len(kernel.calls) == 5
