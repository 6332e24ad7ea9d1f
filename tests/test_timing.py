"""``timing.measure_interleaved``, the bench's clock: columns take turns, every column gets at
least ``iters`` timed calls and at least ``TIMED_MS`` of them, in a shuffled order, after every
column was compiled and warmed up (each reported by ``prepared``)."""
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


def timed_part(log):
    """The calls after the last column was prepared (``prepared`` marks ``"P<column>"``)."""
    return log[max(i for i, x in enumerate(log) if x.startswith("P")) + 1:]


def test_columns_take_turns_after_every_column_was_compiled_and_warmed(fast):
    log = []
    cases = {"a": column(log, "a", 1), "b": column(log, "b", 1)}
    out = timing.measure_interleaved(cases, Timer(torch.device("cpu")), iters=8,
                                     prepared=lambda c: log.append("P" + c))
    assert set(out) == {"a", "b"} and all(v > 0 for v in out.values())
    timed = timed_part(log)
    assert set(log[:len(log) - len(timed)]) == {"a", "b", "Pa", "Pb"}  # compiles and warm-ups first
    assert timed.count("a") == timed.count("b") == 8                   # iters per column, 4 rounds of 2
    rounds = [timed[i:i + 4] for i in range(0, 16, 4)]                 # each round: 2 calls of each
    assert all(sorted(r) == ["a", "a", "b", "b"] and r[0] == r[1] for r in rounds)
    assert [r[0] for r in rounds] == [timing.round_order(["a", "b"], i)[0] for i in range(4)]


def test_the_order_is_shuffled_so_every_column_follows_every_other():
    """A fixed rotation makes a column always follow the same one (on a GPU the column after
    eager ran fastest); shuffled per round, the same on every rank (seeded by the round)."""
    cols = ["eager", "inductor", "again", "bound", "tdist"]
    orders = [timing.round_order(cols, r) for r in range(40)]
    assert all(sorted(o) == sorted(cols) for o in orders)
    assert orders == [timing.round_order(cols, r) for r in range(40)]  # deterministic: ranks agree
    follows = {}
    for o in orders:
        for a, b in zip(o, o[1:]):
            follows[(a, b)] = follows.get((a, b), 0) + 1
    assert len(follows) == 20                                           # every ordered pair occurs
    assert follows.get(("eager", "inductor"), 0) < 20                  # not always the same neighbour


def test_each_column_is_reported_right_after_its_own_preparation(fast):
    log = []
    cases = {"a": column(log, "a", 1), "b": column(log, "b", 1)}
    timing.measure_interleaved(cases, Timer(torch.device("cpu")), iters=2, prepared=lambda c: log.append("P" + c))
    pa, pb = log.index("Pa"), log.index("Pb")
    assert set(log[:pa]) == {"a"} and set(log[pa + 1:pb]) == {"b"} and timed_part(log)


def test_a_fast_row_gets_timed_ms_worth_of_calls(fast, monkeypatch):
    monkeypatch.setattr(timing, "TIMED_MS", 200.0)
    log = []
    timing.measure_interleaved({"a": column(log, "a", 2)}, Timer(torch.device("cpu")), iters=4,
                               prepared=lambda c: log.append("P" + c))
    timed = timed_part(log)
    assert 20 <= len(timed) <= 100                                      # ~200 ms of >= 2 ms calls, not 4
    monkeypatch.setattr(timing, "MAX_CALLS", 8)
    log.clear()
    timing.measure_interleaved({"a": column(log, "a", 1)}, Timer(torch.device("cpu")), iters=4,
                               prepared=lambda c: log.append("P" + c))
    assert len(timed_part(log)) == 8                                    # capped


def test_bursts_time_back_to_back_calls_per_call():
    """``measure_bursts``: each burst runs one column ``calls`` times back to back (rewind before
    every call, no sync in between), columns shuffled per burst; the result is ms per call."""
    log = []

    def col(name, ms):
        def fn():
            log.append(name)
            time.sleep(ms / 1e3)
        return fn, (lambda: log.append("r" + name))

    runs = {"a": col("a", 2), "b": col("b", 4)}
    out = timing.measure_bursts(runs, Timer(torch.device("cpu")), calls=5, bursts=3)
    assert set(out) == {"a", "b"}
    assert 1.8 <= out["a"] < out["b"] and 3.6 <= out["b"] < 8          # per call, not per burst
    assert log.count("a") == log.count("b") == 15 and log.count("ra") == 15
    bursts = [log[i:i + 10] for i in range(0, 60, 10)]                 # one column's 5 calls each
    assert all(len({x.lstrip("r") for x in burst}) == 1 for burst in bursts)
    assert [b[1] for b in bursts[:2]] == timing.round_order(["a", "b"], 1000)
