"""``timing.measure_interleaved``, the bench's clock: columns take turns, every column gets at
least ``iters`` timed calls and at least ``TIMED_MS`` of them, and what runs before the first
timed call (compiles, warm-ups, ``auto``'s first-call measurements) is kept out of the record."""
import time

import pytest
import torch

from tdcompile import timing
from tdcompile.engine import Timer


def column(log, name, ms):
    def fn():
        log.append(name)
        time.sleep(ms / 1e3)
    return fn, None, False


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(timing, "WARMUP_MS", 0.0)
    monkeypatch.setattr(timing, "ROUNDS", 4)


def test_columns_take_turns_and_the_hook_runs_once_before_the_first_timed_call(fast):
    log = []
    cases = {"a": column(log, "a", 1), "b": column(log, "b", 1)}
    out = timing.measure_interleaved(cases, Timer(torch.device("cpu")), iters=8,
                                     before_timing=lambda: log.append("T"))
    assert set(out) == {"a", "b"} and all(v > 0 for v in out.values())
    t = log.index("T")
    assert log.count("T") == 1 and set(log[:t]) == {"a", "b"}          # compiles and warm-ups first
    timed = log[t + 1:]
    assert timed.count("a") == timed.count("b") == 8                   # iters per column, 4 rounds of 2
    assert timed[:4] == ["a", "a", "b", "b"] and timed[4:8] == ["b", "b", "a", "a"]   # the order rotates


def test_a_fast_row_gets_timed_ms_worth_of_calls(fast, monkeypatch):
    monkeypatch.setattr(timing, "TIMED_MS", 200.0)
    log = []
    timing.measure_interleaved({"a": column(log, "a", 2)}, Timer(torch.device("cpu")), iters=4,
                               before_timing=lambda: log.append("T"))
    timed = log[log.index("T") + 1:]
    assert 20 <= len(timed) <= 100                                      # ~200 ms of >= 2 ms calls, not 4
    monkeypatch.setattr(timing, "MAX_CALLS", 8)
    log.clear()
    timing.measure_interleaved({"a": column(log, "a", 1)}, Timer(torch.device("cpu")), iters=4,
                               before_timing=lambda: log.append("T"))
    assert len(log[log.index("T") + 1:]) == 8                           # capped
