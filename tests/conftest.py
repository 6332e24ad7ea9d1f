"""Shared fixtures of the CPU test suite.

``fake_pg``: a session-wide 2-rank *fake* process group (``torch.testing``'s FakeProcessGroup):
collectives trace and run in one process without communicating, so toy graphs built from
``torch.ops._c10d_functional`` ops go through the real tdist passes cheaply. Its collectives
return meaningless data: use it for graph structure, not for numerics.
"""
from __future__ import annotations

import logging

import pytest
import torch.distributed as dist

FAKE_WORLD_SIZE = 2


def pytest_report_header(config):
    markexpr = config.getoption("markexpr") or "(none)"
    return [f"tdcompile tiers: -m {markexpr!r}. Default (README): 'not slow and not fuzz', ~4 min on 2 cores; "
            "CI then runs -m 'slow or fuzz' (end-to-end slow cases + the full graph fuzzer)."]


@pytest.fixture(scope="session")
def fake_pg():
    """The group name of a 2-rank fake process group (this process is rank 0)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    created = False
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=FAKE_WORLD_SIZE)
        created = True
    elif dist.get_world_size() != FAKE_WORLD_SIZE:
        pytest.skip(f"a {dist.get_world_size()}-rank process group is already initialized in this process")
    yield dist.group.WORLD.group_name
    if created:
        dist.destroy_process_group()


@pytest.fixture
def pass_log(caplog):
    """caplog capturing the matchers' DEBUG messages (why a candidate stays unfused)."""
    caplog.set_level(logging.DEBUG, logger="tdcompile.passes")
    return caplog
