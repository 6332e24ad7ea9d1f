"""Graph fuzzer: random tensor-parallel toy programs compiled with ``backend="tdist"`` under
every strategy (dynamic on and off) compute what eager computes, on 2 gloo ranks.

Each case is one seed (tests/fuzz_programs.py turns it into a program, shapes, a strategy
and a dynamic setting). For every case and rank: the compile succeeds, the backend did not
fall back to the unrewritten graph ("tdist pass failed" warning), the rewrite report renders,
and every output equals eager within 1e-4 (relative to its scale).

* default suite: the fast slice, ``FAST_SEEDS`` (50 cases, about a minute), and ``BOUND_SEEDS``
  under ``strategy="bound"`` (shapes and dtypes only: its values are not valid);
* ``-m fuzz``: ``FUZZ_SEEDS`` (600 cases), run by ``.ci/run``;
* replay one case: ``TDIST_FUZZ_SEED=<seed> python3 -m pytest -q -p no:cacheprovider tests/test_fuzz.py``
  (also comma-separated seeds); ``python3 tests/fuzz_programs.py <seed>`` prints its program.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter

import pytest

from fuzz_pool import FuzzPool
from fuzz_programs import COLLECTIVE_OPS, STRATEGIES, make_case

FAST_SEEDS = list(range(50))
BOUND_SEEDS = list(range(10))
FUZZ_SEEDS = list(range(1000, 1600))
REPLAY = [int(s) for s in os.environ.get("TDIST_FUZZ_SEED", "").replace(",", " ").split()]
SEEN: dict[int, list] = {}     # seed -> both ranks' results, for the coverage checks at the end


@pytest.fixture(scope="session")
def fuzz_pool():
    pool = FuzzPool()
    pool.start()
    yield pool
    pool.close()


HUNG = "died or gave no answer"
MAX_HUNG_RETRIES = 2
"""Cases (per session) that may hang once and pass on a fresh pool (reported as a warning with
the hung ranks' stacks); a case that hangs twice, or more such cases, fail.  CI, 2026-11-27: seed
1225 hung once (no answer in 240 s, empty stderr) and passed in 4 local runs of the tier."""
HUNG_ONCE: list[int] = []


def check_case(pool: FuzzPool, seed: int, strategy: str | None = None) -> None:
    results = pool.run(seed, strategy)
    if any(HUNG in (r["error"] or "") for r in results) and len(HUNG_ONCE) < MAX_HUNG_RETRIES:
        HUNG_ONCE.append(seed)                       # the pool restarted its ranks: once more
        stacks = next(r.get("stderr", "") for r in results if r["error"])
        results = pool.run(seed, strategy)
        warnings.warn(f"fuzz seed {seed}: a rank hung (stacks below); on a fresh pool it "
                      f"{'failed again' if any(r['error'] for r in results) else 'passed'}\n{stacks}")
    if strategy is None:
        SEEN[seed] = results
    case = make_case(seed)
    replay = (f"replay: TDIST_FUZZ_SEED={seed} python3 -m pytest -q -p no:cacheprovider tests/test_fuzz.py\n"
              f"{case.describe()}" + (f"\n(strategy overridden: {strategy!r})" if strategy else ""))
    for rank, r in enumerate(results):
        assert not r["fallback"], f"rank {rank}: the pass fell back to the unrewritten graph: {r['fallback']}\n{replay}"
        assert not r["error"], f"rank {rank}: {r['error']}\n{r.get('stderr', '')}\n{replay}"
    assert results[0]["rewritten"] == results[1]["rewritten"], f"ranks rewrote differently\n{replay}"


@pytest.mark.parametrize("seed", REPLAY or FAST_SEEDS)
def test_random_program_compiles_without_fallback_and_equals_eager(fuzz_pool, seed):
    check_case(fuzz_pool, seed)


@pytest.mark.parametrize("seed", BOUND_SEEDS)
def test_bound_compiles_every_program_to_outputs_of_the_right_shapes(fuzz_pool, seed):
    """``strategy="bound"`` (every collective a no-op: a timing bound, values NOT valid) never
    fails a compile and keeps every output's shape and dtype."""
    check_case(fuzz_pool, seed, "bound")


@pytest.mark.fuzz
@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_fuzz_tier_random_program_compiles_without_fallback_and_equals_eager(fuzz_pool, seed):
    check_case(fuzz_pool, seed)


def test_fast_slice_spans_every_strategy_dynamic_both_ways_and_every_collective():
    cases = [make_case(s) for s in FAST_SEEDS]
    assert {c.strategy for c in cases} == set(STRATEGIES)
    assert {c.dynamic for c in cases} == {True, False}
    assert {c.profile for c in cases if c.strategy == "auto"} >= {None, "h100"}
    source = "\n".join(c.source for c in cases)
    for op in (*COLLECTIVE_OPS, "G[1]", "self.lin", ".reshape(", "rsqrt"):
        assert op in source, f"no fast-slice program uses {op}"
    ranks = {c.inputs[0][1][:-1] for c in cases}
    assert any(len(r) == 1 and r[0] < 2 for r in ranks) and any(len(r) == 1 and r[0] % 2 for r in ranks)  # M < W, odd M
    assert any(len(r) == 2 for r in ranks)                                                             # 3-D inputs


def test_fast_slice_rewrote_every_pattern_at_least_once():
    """The fuzzer exercises the rewrites, not only Inductor: across the fast slice every
    pattern was fused somewhere (runs after the slice; skipped when the slice did not run)."""
    done = [SEEN[s] for s in FAST_SEEDS if s in SEEN]
    if len(done) < len(FAST_SEEDS):
        pytest.skip("the fast slice did not run in this session")
    patterns = Counter(p for results in done for p in results[0]["patterns"])
    assert set(patterns) >= {"gemm_all_reduce", "all_reduce", "all_gather_gemm", "gemm_reduce_scatter"}, patterns
    assert sum(results[0]["rewritten"] > 0 for results in done) >= len(done) // 3


def test_a_case_that_hangs_once_is_retried_on_a_fresh_pool_and_reported_a_second_hang_fails(monkeypatch):
    ok = {"error": None, "fallback": [], "rewritten": 0, "patterns": []}
    hung = {**ok, "error": f"rank 0 {HUNG} within 240 s", "stderr": "Thread 0x1 (most recent call first): ..."}

    class Pool:                                     # answers in turn, as FuzzPool.run would
        def __init__(self, *answers):
            self.answers = list(answers)

        def run(self, seed, strategy=None):
            return self.answers.pop(0)
    monkeypatch.setattr("test_fuzz.HUNG_ONCE", [])
    monkeypatch.setattr("test_fuzz.SEEN", {})
    with pytest.warns(UserWarning, match="hung .*passed"):
        check_case(Pool([hung, ok], [ok, ok]), 1000)
    with pytest.raises(AssertionError, match="no answer"), pytest.warns(UserWarning, match="failed again"):
        check_case(Pool([hung, ok], [hung, ok]), 1001)
    with pytest.raises(AssertionError, match="no answer"):      # the retries are spent: no third
        check_case(Pool([hung, ok], [ok, ok]), 1002)
