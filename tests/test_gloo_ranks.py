"""The harness that runs CPU ranks for the multi-process tests: ranks meet through a rendezvous file
and return their results; a rank that hangs does not hang the suite -- it dumps its stacks, exits,
and the test fails showing where it waited."""
import os

import pytest

import gloo_ranks

WORKER = """
import json, sys, time
sys.path.insert(0, {tests!r})
import gloo_ranks
import torch.distributed as dist
rank, rdzv, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
gloo_ranks.init(rank, 2, rdzv)
t = __import__("torch").tensor([rank + 1.0])
if mode == "hang" and rank == 1:
    time.sleep(3600)                 # never joins: rank 0 waits in the all_reduce
if mode == "die" and rank == 1:
    import os; os._exit(3)           # dies (as if killed): its connections close
dist.all_reduce(t)
print("RESULT " + json.dumps({{"sum": float(t)}}), flush=True)
gloo_ranks.finish()
"""


def _worker(tmp_path) -> str:
    path = tmp_path / "worker.py"
    path.write_text(WORKER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    return str(path)


def test_ranks_meet_through_the_rendezvous_file_and_return_their_results(tmp_path):
    assert [r["sum"] for r in gloo_ranks.collect(gloo_ranks.start(_worker(tmp_path), 2, "ok"))] == [3.0, 3.0]


def test_a_hung_rank_dumps_its_stacks_and_fails_the_test_instead_of_hanging_it(tmp_path, monkeypatch):
    monkeypatch.setattr(gloo_ranks, "HANG_S", 8.0)
    procs = gloo_ranks.start(_worker(tmp_path), 2, "hang")
    with pytest.raises(AssertionError) as e:
        gloo_ranks.collect(procs, timeout=120)
    assert "rank 0 failed" in str(e.value)
    assert "Timeout" in str(e.value) and "worker.py" in str(e.value)   # faulthandler's dump: where it waited


def test_a_rank_that_dies_fails_the_test_at_once_naming_it(tmp_path):
    import time
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="rank [01] failed"):
        gloo_ranks.collect(gloo_ranks.start(_worker(tmp_path), 2, "die"), timeout=120)
    assert time.monotonic() - t0 < 60          # the peer's collective errors out; nobody waits for timeouts
