"""The measured table and the rank agreement behind ``strategy="auto"`` (tdcompile/measured.py,
ops/cuda.py ``ready``): keys and buckets, the tie rule, files keyed by the environment, and --
on 2 gloo ranks -- that every rank reaches the same decision even when their caches differ or
one rank cannot run a family."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from tdcompile import measured
from tdcompile.measured import Key, bucket, choose
from gloo_ranks import free_port

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "world": 2, "torch": "2.11.0", "tdcompile": "0.1.0", "triton": "3.6.0"}


def test_m_buckets_are_the_next_power_of_two():
    assert [bucket(m) for m in (1, 2, 3, 100, 128, 129, 4096, 5000)] == [1, 2, 4, 128, 128, 256, 4096, 8192]


def test_a_key_round_trips_through_its_id():
    k = Key.of("gemm_all_reduce", m=100, n=5120, k=12800, dtype=torch.bfloat16, world=2)
    assert k.id() == "gemm_all_reduce|n=5120|k=12800|bfloat16|w=2|m=128"
    assert Key.parse(k.id()) == k


@pytest.mark.parametrize("times,expected", [
    ({"unfused": 20.0, "fused": 44.0}, "unfused"),
    ({"unfused": 20.0, "fused": 19.8}, "unfused"),                          # within the margin: tie -> unfused
    ({"unfused": 936.1, "fused:two_shot": 892.5}, "unfused"),               # 4.7% (M=4096, 2xH200): still a tie
    ({"unfused": 20.0, "fused": 15.0, "symm_mem:two_shot": 13.0}, "symm_mem:two_shot"),
    ({"unfused": 20.0, "fused": math.inf}, "unfused"),                      # failed candidate
    ({"fused": 5.0}, "unfused"),                                            # unfused unknown: never leave it
])
def test_the_fastest_candidate_wins_only_by_more_than_the_tie_margin(times, expected):
    assert choose(times)[0] == expected
    assert choose(times, 4096)[0] == expected                               # large M: the same margin


def test_decode_sized_rows_take_a_smaller_win():
    """M <= SMALL_M: wins above TIE_SMALL (8%) are taken; a larger M keeps the 15% margin."""
    down = {"unfused": 65.3, "fused:lamport": 56.5}                # 0.865x: down_proj, M=128, 2xH200
    assert choose(down, 128)[0] == "fused:lamport"
    assert choose(down, 4096)[0] == "unfused" and choose(down)[0] == "unfused"
    assert choose({"unfused": 20.0, "fused": 18.7}, 128)[0] == "unfused"     # 6.5%: inside even the small margin
    assert measured.tie(measured.SMALL_M) == measured.TIE_SMALL and measured.tie(measured.SMALL_M * 2) == measured.TIE


def test_graphed_large_rows_take_a_win_above_ten_percent():
    """Under CUDA graphs (``charge_host=False``) M > SMALL_M needs TIE_GRAPHED (10%), un-graphed
    still TIE (15%); decode sizes keep TIE_SMALL either way."""
    down = {"unfused": 955.3, "fused:chain2": 825.0, "host:unfused": 288.5, "host:fused:chain2": 60.2}
    assert choose(down, 4096, charge_host=False)[0] == "fused:chain2"         # 0.864x: 2xH100, M=4096
    assert choose(down, 4096)[0] == "unfused"                                 # un-graphed: inside 15%
    assert choose({"unfused": 611.6, "fused:two_shot": 563.8}, 4096, charge_host=False)[0] == "unfused"  # 0.92x
    assert measured.tie(4096, graphed=True) == measured.TIE_GRAPHED < measured.TIE == measured.tie(4096)
    assert measured.tie(128, graphed=True) == measured.TIE_SMALL == measured.tie(128)
    assert choose(down, 4096, margin=0.15, charge_host=False)[0] == "unfused"  # an explicit margin still rules


def test_an_explicit_margin_replaces_the_default_at_every_m():
    """``Options.margin`` (bench column ``tdist:margin5``): 0.852x is taken at a 5% margin and
    kept unfused at the default large-M one; 0.97x stays unfused at 5% too."""
    o_proj = {"unfused": 389.1, "gemm_rms": 331.5}                   # 0.852x, M=4096, 4xH200
    assert choose(o_proj, 4096)[0] == "unfused"
    assert choose(o_proj, 4096, margin=0.05)[0] == "gemm_rms"
    assert choose(o_proj, 128, margin=0.20)[0] == "unfused"                  # larger than TIE_SMALL, too
    assert choose({"unfused": 100.0, "fused": 97.0}, 4096, margin=0.05)[0] == "unfused"
    assert choose({"unfused": 100.0, "fused": 97.0}, 4096, margin=0.0)[0] == "fused"


def test_a_saved_table_loads_back_only_for_the_same_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TDCOMPILE_CACHE_DIR", str(tmp_path))
    t = measured.Table(ENV)
    key = Key.of("all_reduce", m=128, n=5120, k=0, dtype=torch.bfloat16, world=2)
    t.record(key, {"unfused": 20.4, "fused": math.inf})
    path = t.save()
    assert os.path.basename(path) == "h100-80gb-hbm3-w2-torch2.11.0-triton3.6.0-tdc0.1.0.json"
    again = measured.Table(ENV)
    assert again.lookup(key) == ({"unfused": 20.4, "fused": math.inf}, "cached")
    other = dict(ENV, torch="2.13.0")
    with open(path) as f:                                  # a file made on another stack is ignored
        data = json.load(f)
    with open(os.path.join(tmp_path, measured.env_slug(other) + ".json"), "w") as f:
        json.dump(data, f)
    assert measured.Table(other).lookup(key) is None


# ------------------------------------------------------------------ 2 gloo ranks
def _worker(rank: int, port: int, cache_root: str, q) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TDCOMPILE_CACHE_DIR=os.path.join(cache_root, f"rank{rank}"))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from tdcompile.ops import cuda as opc
        g = dist.group.WORLD.group_name
        res = {}
        # 1. agreement: true only where every rank says true
        res["agree_mixed"] = measured.all_agree(rank == 0, g)
        res["agree_all"] = measured.all_agree(True, g)
        # 2. per-rank caches disagree (rank 1 measured fused faster): both take the max -> same choice
        key = Key.of("all_reduce", m=128, n=64, k=0, dtype=torch.float32, world=2)
        tab = measured.table(2)
        tab.record(key, {"unfused": 20.0, "fused": 10.0 if rank == 1 else 30.0}, "cached")
        times, source = measured.agreed_times(key, g, ["unfused", "fused"], lambda: {})
        res["times"], res["source"], res["choice"] = times, source, measured._AGREED[(key, g)][0]
        # 3. a key only one rank has cached is measured by both (the measure_fn runs on every rank)
        key2 = Key.of("all_reduce", m=256, n=64, k=0, dtype=torch.float32, world=2)
        if rank == 0:
            tab.record(key2, {"unfused": 1.0, "fused": 0.5}, "cached")
        times2, source2 = measured.agreed_times(key2, g, ["unfused", "fused"],
                                                lambda: {"unfused": 5.0 + rank, "fused": 9.0})
        res["times2"], res["source2"] = times2, source2
        # 3b. an entry every rank has, lacking a candidate that joined later: only that one is
        # measured (the shipped times of the others are kept), and the merged entry is recorded
        key3 = Key.of("all_reduce", m=512, n=64, k=0, dtype=torch.float32, world=2)
        tab.record(key3, {"unfused": 20.0, "fused": 18.0}, "shipped")
        asked = []
        times3, source3 = measured.agreed_times(
            key3, g, ["unfused", "fused", "fused:new"],
            lambda only=None: (asked.append(only), {c: 7.0 + rank for c in (only or ["unfused", "fused", "fused:new"])})[1])
        res["asked3"], res["times3"], res["source3"] = asked, times3, source3
        res["choice3"], res["entry3"] = measured._AGREED[(key3, g)][0], tab.lookup(key3)[0]
        # 3c. a candidate whose code changed since it was measured (stale) is the only one measured again
        key4 = Key.of("all_reduce", m=1024, n=64, k=0, dtype=torch.float32, world=2)
        tab.record(key4, {"unfused": 20.0, "fused:one_shot": 15.0, "fused:lamport": 30.0}, "shipped")
        measured._DIGESTS[("all_reduce", "fused:lamport")] = "0123456789ab"       # its kernel changed
        asked4 = []
        times4, _ = measured.agreed_times(
            key4, g, ["unfused", "fused:one_shot", "fused:lamport"],
            lambda only=None: (asked4.append(only), {c: 5.0 for c in only or []})[1])
        res["asked4"], res["times4"] = asked4, times4
        # 3d. look up only (a hypothetical graph's costing): a missing key is not measured, nor recorded
        key5 = Key.of("all_reduce", m=2048, n=64, k=0, dtype=torch.float32, world=2)
        res["lookup_only"] = list(measured.agreed_times(key5, g, ["unfused", "fused"], None))
        res["lookup_only_recorded"] = tab.lookup(key5) is not None or (key5, g) in measured._AGREED
        # 3e. a measurement that failed as a whole (unfused not timed, e.g. out of memory) decides
        # unfused now but is not recorded: the next process measures again
        key6 = Key.of("all_reduce", m=4096, n=64, k=0, dtype=torch.float32, world=2)
        t6, _ = measured.agreed_times(key6, g, ["unfused", "fused"],
                                      lambda only=None: {"unfused": math.inf, "fused": math.inf})
        res["failed_choice"] = measured.choose(t6)[0]
        res["failed_recorded"] = tab.lookup(key6) is not None
        # 4. a family one rank cannot run runs on no rank (no rank waits on a peer that fell back)
        res["ready_fault"] = opc.ready("all_reduce", "fused", g, ("sig",), lambda: None if rank == 0 else "no P2P")
        res["ready_ok"] = opc.ready("all_reduce", "symm_mem", g, ("sig",), lambda: None)
        os.environ["TDCOMPILE_FAULT_INJECT"] = "symm_mem:1"
        res["ready_injected"] = opc.ready("all_reduce", "symm_mem", g, ("sig2",), lambda: None)
        q.put((rank, res))
    except Exception as e:  # noqa: BLE001
        q.put((rank, repr(e)))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    ctx = mp.get_context("spawn")
    q, port, root = ctx.Queue(), free_port(), str(tmp_path_factory.mktemp("cache"))
    procs = [ctx.Process(target=_worker, args=(r, port, root, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for r, v in out.items():
        assert isinstance(v, dict), f"rank {r}: {v}"
    return out


def test_ranks_agree_only_when_all_are_willing(two_rank_results):
    for r in (0, 1):
        assert two_rank_results[r]["agree_mixed"] is False and two_rank_results[r]["agree_all"] is True


def test_differing_caches_give_every_rank_the_same_max_times_and_choice(two_rank_results):
    r0, r1 = two_rank_results[0], two_rank_results[1]
    assert r0["times"] == r1["times"] == {"unfused": 20.0, "fused": 30.0}
    assert r0["choice"] == r1["choice"] == "unfused"


def test_a_key_cached_on_one_rank_only_is_measured_on_all(two_rank_results):
    r0, r1 = two_rank_results[0], two_rank_results[1]
    assert r0["source2"] == r1["source2"] == "measured"
    assert r0["times2"] == r1["times2"] == {"unfused": 6.0, "fused": 9.0}


def test_a_candidate_new_since_the_table_was_shipped_is_the_only_one_measured(two_rank_results):
    for r in (0, 1):
        res = two_rank_results[r]
        assert res["asked3"] == [["fused:new"]]                     # not unfused or fused again
        assert res["times3"] == {"unfused": 20.0, "fused": 18.0, "fused:new": 8.0}   # max over ranks
        assert res["source3"] == "measured" and res["choice3"] == "fused:new"
        assert res["entry3"] == res["times3"]                       # recorded for the next compile


def test_a_candidate_whose_code_changed_is_the_only_one_measured_again(two_rank_results):
    for r in (0, 1):
        res = two_rank_results[r]
        assert res["asked4"] == [["fused:lamport"]]
        assert res["times4"] == {"unfused": 20.0, "fused:one_shot": 15.0, "fused:lamport": 5.0}


def test_a_look_up_only_agreement_measures_and_records_nothing(two_rank_results):
    for r in (0, 1):
        assert two_rank_results[r]["lookup_only"] == [None, ""]
        assert two_rank_results[r]["lookup_only_recorded"] is False


def test_a_measurement_that_failed_as_a_whole_keeps_unfused_and_is_not_recorded(two_rank_results):
    for r in (0, 1):
        assert two_rank_results[r]["failed_choice"] == "unfused"
        assert two_rank_results[r]["failed_recorded"] is False


def test_a_family_that_fails_on_one_rank_is_disabled_on_every_rank(two_rank_results):
    for r in (0, 1):
        res = two_rank_results[r]
        assert res["ready_fault"] is False and res["ready_ok"] is True and res["ready_injected"] is False


def test_an_all_reduce_claimed_twice_goes_to_the_decision_that_saves_more():
    from types import SimpleNamespace as NS
    from tdcompile.claims import one_claim_per_all_reduce
    from tdcompile.cost_model import Decision
    from tdcompile.passes.match import Decided

    def decided(pattern, ar, choice, times):
        return Decided(NS(pattern=pattern, ar=ar), Decision(choice, times, "measured", "cached"))

    gemm = decided("gemm_all_reduce", "ar0", "fused:one_shot", {"unfused": 70.6, "fused:one_shot": 54.7})
    rms = decided("all_reduce_rmsnorm", "ar0", "fused:one_shot", {"unfused": 20.9, "fused:one_shot": 15.1})
    lone = decided("all_reduce_rmsnorm", "ar1", "fused:one_shot", {"unfused": 20.9, "fused:one_shot": 15.1})
    out = one_claim_per_all_reduce([rms, lone], [gemm])
    assert {id(d) for d in out} == {id(gemm), id(rms), id(lone)}
    assert gemm.choice == "fused:one_shot" and lone.choice == "fused:one_shot"        # 15.9 us > 5.8 us saved
    assert rms.choice == "unfused" and "goes to gemm_all_reduce (fused:one_shot): which saves" in rms.reason


def test_an_all_reduce_claimed_three_ways_goes_to_the_largest_fusion_whose_gain_is_close_to_the_best():
    from types import SimpleNamespace as NS
    from tdcompile.claims import CLOSE_GAIN, one_claim_per_all_reduce
    from tdcompile.cost_model import Decision
    from tdcompile.passes.match import Decided

    def decided(pattern, choice, times):
        return Decided(NS(pattern=pattern, ar="ar0"), Decision(choice, times, "measured", "cached"))

    def claim(grms_gain):                   # gains: RMSNorm op 100 us, GEMM op 90, GEMM + RMSNorm op grms_gain
        rms = decided("all_reduce_rmsnorm", "fused:one_shot", {"unfused": 300.0, "fused:one_shot": 200.0})
        gar = decided("gemm_all_reduce", "fused:one_shot", {"unfused": 900.0, "fused:one_shot": 810.0})
        grms = decided("gemm_all_reduce_rmsnorm", "fused:one_shot",
                       {"unfused": 1000.0, "fused:one_shot": 1000.0 - grms_gain})
        one_claim_per_all_reduce([rms, grms], [gar])
        return [d.pattern for d in (rms, gar, grms) if d.choice != "unfused"]

    assert claim(100.0 * CLOSE_GAIN + 1) == ["gemm_all_reduce_rmsnorm"]      # close to the best: covers more
    assert claim(100.0 * CLOSE_GAIN - 1) == ["all_reduce_rmsnorm"]           # clearly less: the best gain
    assert claim(150.0) == ["gemm_all_reduce_rmsnorm"]


def test_sequence_parallel_costing_counts_what_the_rmsnorm_fusions_save_beyond_the_gemm_match():
    """The all_reduce form's cost is its GEMM / all-reduce matches' times, less what an RMSNorm
    fusion of the same all-reduce saves beyond them (``claims.rmsnorm_savings``)."""
    from types import SimpleNamespace as NS
    from tdcompile.claims import rmsnorm_savings
    from tdcompile.cost_model import Decision
    from tdcompile.passes.match import Decided

    def decided(pattern, ar, choice, unfused, fused):
        return Decided(NS(pattern=pattern, ar=ar), Decision(choice, {"unfused": unfused, choice: fused}, "", "cached"))

    others = [decided("gemm_all_reduce", "ar0", "fused:one_shot", 100.0, 90.0),     # saves 10
              decided("gemm_all_reduce", "ar1", "unfused", 100.0, 100.0)]          # saves 0
    rms = [decided("all_reduce_rmsnorm", "ar0", "fused:one_shot", 60.0, 30.0),     # ar0: 30 > 10 -> +20
           decided("gemm_all_reduce_rmsnorm", "ar0", "fused:one_shot", 160.0, 125.0),   # 35 -> +25 (best)
           decided("all_reduce_rmsnorm", "ar1", "unfused", 60.0, 55.0),            # not chosen: nothing
           decided("all_reduce_rmsnorm", "ar2", "fused:lamport", 20.0, 8.0)]       # no GEMM match: +12
    assert rmsnorm_savings(rms, others) == pytest.approx(25.0 + 12.0)
    assert rmsnorm_savings([], others) == 0.0


def _sp_toy_gathered(x, w1, w2):                                # x [M, K]: an MLP-like block
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    h = funcol.all_reduce(torch.mm(x, w1), "sum", dist.group.WORLD)          # [M, 16]; under SP: RS, AG -> mm
    u = torch.relu(torch.mm(h, w2))                                          # [M, 32] column-parallel
    return funcol.all_reduce(torch.mm(u, w1), "sum", dist.group.WORLD)       # [M, 16] row-parallel


def _sp_toy(x, w1, w2):                                          # x [M, K]
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    h = funcol.all_reduce(torch.mm(x, w1), "sum", dist.group.WORLD)          # row-parallel linear
    return funcol.all_reduce(torch.mm(torch.relu(h), w2), "sum", dist.group.WORLD)


def _sp_decision(times_of, gemm_of=lambda mnk: 0.0, toy=None, margin=None):
    """measured_sequence_parallel on the toy graph, with a table given by ``times_of(pattern, mnk)``
    and an all_gather_gemm's GEMM alone by ``gemm_of(mnk)`` (None: not measured)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from tdcompile.backend import measured_sequence_parallel
    from tdcompile.config import Options
    from tdcompile.cost_model import Decision
    from tdcompile.passes.match import Decided

    def decide(m, may_measure=True):
        t = times_of(m.pattern, m.mnk())
        if t is None:
            return Decided(m, Decision("auto", {}, "not measured"))
        return Decided(m, Decision(measured.choose(t)[0], t, "", "cached"))
    gm = make_fx(toy or _sp_toy, tracing_mode="fake")(torch.randn(64, 32), torch.randn(32, 16), torch.randn(16, 32))
    return measured_sequence_parallel(gm.graph, Options(strategy="auto", margin=margin), decide,
                                      gemm_us=lambda m, may_measure: gemm_of(m.mnk()))


def test_on_a_gpu_sequence_parallel_needs_every_match_of_both_forms_measured(fake_pg):
    d = _sp_decision(lambda p, mnk: {"unfused": 10.0} if p == "gemm_all_reduce" else None)
    assert d.choice == "all_reduce" and "not measured" in d.reason and "calibrate --sp" in d.reason


@pytest.mark.parametrize("sp_us,expected", [(5.0, "sequence_parallel"), (9.0, "all_reduce")])
def test_on_a_gpu_sequence_parallel_is_chosen_only_when_measured_faster(fake_pg, sp_us, expected):
    # the all_reduce form: 2 gemm_all_reduce at 10 us; the SP form: every match at sp_us
    d = _sp_decision(lambda p, mnk: {"unfused": 10.0} if p == "gemm_all_reduce" else {"unfused": sp_us})
    assert d.choice == expected and d.candidates_us["all_reduce"] == 20.0


def test_the_margin_option_also_sets_how_much_faster_sequence_parallel_must_be(fake_pg):
    # all_reduce form 20 us; SP form 2 x 8.75 = 17.5 us (0.875x): inside 15%, outside 5%
    def times_of(p, mnk):
        return {"unfused": 10.0} if p == "gemm_all_reduce" else {"unfused": 8.75}
    assert _sp_decision(times_of).choice == "all_reduce"
    d = _sp_decision(times_of, margin=0.05)
    assert d.choice == "sequence_parallel" and d.candidates_us == {"all_reduce": 20.0, "sequence_parallel": 17.5}


def test_sequence_parallel_is_costed_by_the_communication_each_form_adds(fake_pg):
    """An all_gather_gemm holds a GEMM that the all_reduce form runs outside any match: its time
    alone is taken off the SP form's sum. Without that, SP (here 5 us of gather on a 40 us GEMM)
    could never win; with it, it wins; a GEMM not measured alone keeps all_reduce."""
    def times_of(p, mnk):
        if p == "gemm_all_reduce":
            return {"unfused": 10.0}                  # the all_reduce form: 2 x 10 us
        return {"unfused": 45.0} if p == "all_gather_gemm" else {"unfused": 5.0}
    kinds = []

    def gemm_of(mnk):
        kinds.append(mnk)
        return 40.0

    d = _sp_decision(times_of, gemm_of, _sp_toy_gathered)
    assert kinds and d.choice == "sequence_parallel", d.reason      # SP sum: (45 - 40) + the rest
    assert d.candidates_us["sequence_parallel"] < d.candidates_us["all_reduce"] == 20.0
    assert _sp_decision(times_of, lambda mnk: 0.0, _sp_toy_gathered).choice == "all_reduce"   # GEMM counted twice
    missing = _sp_decision(times_of, lambda mnk: None, _sp_toy_gathered)
    assert missing.choice == "all_reduce" and "GEMM alone" in missing.reason


def test_skipped_candidates_are_not_measured_but_unfused_always_is(monkeypatch):
    from tdcompile import measure
    monkeypatch.setenv("TDCOMPILE_SKIP_CANDIDATES", "fused:lamport, unfused,symm_mem:two_shot")
    got = measure.candidates("all_reduce")
    assert "fused:lamport" not in got and "symm_mem:two_shot" not in got
    assert "host:fused:lamport" not in got                       # nor its host time
    assert got[:2] == ["unfused", "host:unfused"] and "fused:one_shot" in got
    monkeypatch.delenv("TDCOMPILE_SKIP_CANDIDATES")
    assert [c for c in measure.candidates("all_reduce") if not c.startswith("host:")] == measure.CANDIDATES["all_reduce"]


def test_every_candidate_is_measured_with_its_host_time_but_the_gemm_reference_is_not():
    from tdcompile import measure
    got = measure.candidates("gemm_reduce_scatter")
    assert got == [n for c in measure.CANDIDATES["gemm_reduce_scatter"] for n in (c, "host:" + c)]
    assert measure.candidates("gemm") == ["unfused"]


def test_a_host_time_entry_is_keyed_by_the_candidates_files_and_the_op_dispatch_and_launch_path():
    files = measured.impl_files("all_gather_gemm", "host:fused:ce")
    assert set(measured.impl_files("all_gather_gemm", "fused:ce")) <= set(files) and "ops/cuda.py" in files
    assert measured.impl_files("all_reduce", "host:unfused") == ["ops/cuda.py", "ops/library.py", "ops/op_graphs.py"]


def test_a_candidate_can_be_skipped_for_one_op_only(monkeypatch):
    from tdcompile import measure
    monkeypatch.setenv("TDCOMPILE_SKIP_CANDIDATES", "all_reduce_rmsnorm/fused:lamport,gemm_all_reduce/fused:ce2")
    assert "fused:lamport" not in measure.candidates("all_reduce_rmsnorm")
    assert "fused:lamport" in measure.candidates("all_reduce")
    got = measure.candidates("gemm_all_reduce")
    assert "fused:ce2" not in got and "fused:ce4" in got and got[0] == "unfused"


def test_an_entry_measured_with_other_kernel_code_is_measured_again(tmp_path, monkeypatch):
    """Times are stored with a digest of the files implementing each candidate; when that code
    changes the entry no longer counts (``lookup`` -> None: the next call measures afresh).
    Entries written before digests existed carry none and still count."""
    monkeypatch.setenv("TDCOMPILE_CACHE_DIR", str(tmp_path))
    key = Key.of("all_reduce", m=128, n=5120, k=0, dtype=torch.bfloat16, world=2)
    t = measured.Table(ENV)
    t.record(key, {"unfused": 20.4, "fused:one_shot": 10.0, "fused:lamport": 8.0})
    path = t.save()
    with open(path) as f:
        saved = json.load(f)
    assert saved["digests"][key.id()]["unfused"] == ""                   # NCCL: the torch version keys it
    assert saved["digests"][key.id()]["fused:lamport"] == measured.impl_digest("all_reduce", "fused:lamport")
    assert measured.Table(ENV).lookup(key) is not None                   # same code: used
    # the Lamport kernel's source changes (another digest): the entry is stale for that candidate
    monkeypatch.setitem(measured._DIGESTS, ("all_reduce", "fused:lamport"), "0123456789ab")
    again = measured.Table(ENV)
    assert again.stale(key) == ["fused:lamport"] and again.lookup(key) is None
    # a legacy entry (no digests) is kept
    del saved["digests"]
    with open(path, "w") as f:
        json.dump(saved, f)
    assert measured.Table(ENV).lookup(key) is not None


def test_calibrate_reuse_also_refreshes_stale_entries_of_shapes_not_asked_for(tmp_path, monkeypatch):
    """``calibrate --reuse`` measures the model's keys plus every table entry whose code changed
    since (here a sequence-parallel key, asked for only with ``--sp``); fresh entries of other
    shapes are left alone."""
    from tdcompile.calibrate import with_stale
    monkeypatch.setenv("TDCOMPILE_CACHE_DIR", str(tmp_path))
    asked = Key.of("all_reduce", m=4096, n=5120, k=0, dtype=torch.bfloat16, world=2)
    sp = Key.of("gemm_reduce_scatter", m=4096, n=5120, k=12800, dtype=torch.bfloat16, world=2)
    fresh = Key.of("gemm_reduce_scatter", m=128, n=5120, k=12800, dtype=torch.bfloat16, world=2)
    env = {**ENV, "gpu": "no shipped table"}                              # the cache file only
    t = measured.Table(env)
    for k in (asked, sp, fresh):
        t.record(k, {"unfused": 900.0, "fused:ce": 835.0})
    t.save()
    monkeypatch.setitem(measured._DIGESTS, ("gemm_reduce_scatter", "fused:ce"), "0123456789ab")
    t = measured.Table(env)
    t.digests[fresh.id()]["fused:ce"] = "0123456789ab"                   # measured on the changed code
    said = []
    keys = with_stale([asked], t, said.append)
    assert [k.id() for k in keys] == [asked.id(), sp.id()]
    assert sp.id() in said[0] and fresh.id() not in said[0]
    assert with_stale([asked, sp], t, said.append) == [asked, sp]        # asked for already: not twice


def test_each_candidate_is_keyed_by_the_files_that_implement_it():
    files = measured.impl_files
    assert files("all_reduce", "unfused") == []
    # all_reduce_rmsnorm's unfused baseline runs tdcompile's stand-in for Inductor's norm kernel
    assert "kernels/add_rmsnorm.py" in files("all_reduce_rmsnorm", "unfused")
    assert "kernels/all_reduce_rmsnorm_lamport2.py" in files("all_reduce_rmsnorm", "fused:lamport2")
    assert "kernels/all_reduce_rmsnorm_lamport2.py" not in files("all_reduce", "fused:lamport2")
    assert "kernels/all_reduce_lamport.py" in files("all_reduce", "fused:lamport")
    assert "kernels/all_reduce.py" not in files("all_reduce", "fused:lamport")
    assert "kernels/all_reduce_rmsnorm.py" in files("all_reduce_rmsnorm", "fused:two_shot")
    assert "ops/overlap.py" in files("gemm_all_reduce", "fused:pipe4_nccl")
    assert "kernels/gemm_all_reduce_ce.py" in files("gemm_all_reduce", "fused:ce4")
    assert "kernels/all_gather_gemm_ce.py" in files("all_gather_gemm", "fused:ce")
    assert "kernels/gemm_reduce_scatter_ce.py" in files("gemm_reduce_scatter", "fused:ce")
    assert "kernels/gemm_all_reduce_ce.py" not in files("all_gather_gemm", "fused:ce")
    assert "kernels/gemm_reduce_scatter.py" in files("gemm_reduce_scatter", "fused")
    assert files("all_gather_gemm", "symm_mem") == ["ops/symm_mem.py"]
    import os as _os
    for op, impl in [("all_reduce", "fused:one_shot"), ("gemm_all_reduce", "fused"), ("all_gather_gemm", "fused"),
                     ("all_reduce_rmsnorm", "fused:lamport2"), ("all_reduce_rmsnorm", "unfused")]:
        for rel in files(op, impl):                                        # every named file exists
            assert _os.path.exists(_os.path.join(measured._PKG, rel)), rel


# the SP form's q/k/v AG-GEMM at M=4096 on 4xH200 (calibrate-h200-tp4-20261127-1553-host.json, us)
AG = {"unfused": 279.0, "fused:ce": 194.1, "host:unfused": 285.3, "host:fused:ce": 1000.0}


def test_un_graphed_a_call_costs_at_least_its_host_time():
    eff = measured.effective(AG)
    assert eff == {"unfused": 279.0, "fused:ce": 1000.0}       # unfused: Inductor's code runs, device time
    assert measured.effective(AG, charge_host=False) == {"unfused": 279.0, "fused:ce": 194.1}
    assert choose(AG, 4096)[0] == "unfused"                                   # 1000 vs 285: loses un-graphed
    assert choose(AG, 4096, charge_host=False)[0] == "fused:ce"               # 0.70x: wins under CUDA graphs


def test_a_host_time_below_the_device_time_changes_nothing():
    """o_proj's GEMM + all-reduce + RMSNorm at M=4096 on 2xH200: host 230 us under a 360 us call
    (unfused: 201 under 437), 0.82x either way; missing or failed host times charge nothing."""
    o_proj = {"unfused": 436.9, "fused:one_shot": 359.8, "host:unfused": 200.9, "host:fused:one_shot": 229.5}
    assert measured.effective(o_proj) == measured.device_times(o_proj)
    assert choose(o_proj, 4096)[0] == "fused:one_shot"
    assert measured.effective({"unfused": 100.0, "fused": 80.0, "host:fused": 900.0})["fused"] == 900.0
    assert measured.effective({**AG, "host:fused:ce": math.inf})["fused:ce"] == 194.1
    assert measured.effective({"unfused": 100.0, "fused": 80.0})["fused"] == 80.0


def test_un_graphed_decode_sized_calls_keep_inductors_code_when_their_host_time_is_longer():
    """all_reduce + add + RMSNorm at M=128 on 2xH200: 8.6 us on the device but 134 us of host
    time un-graphed; Inductor's code takes 24.6 us. Under CUDA graphs the fused call wins."""
    rms = {"unfused": 24.6, "fused:lamport": 8.6, "host:unfused": 174.3, "host:fused:lamport": 134.3}
    assert choose(rms, 128)[0] == "unfused"
    assert choose(rms, 128, charge_host=False)[0] == "fused:lamport"


def test_the_compile_time_decision_charges_host_time_unless_the_graph_is_cuda_graphed(monkeypatch):
    """``backend.decide_measured``: the same agreed times give the AG-GEMM to ``fused:ce`` for a
    graph that will be CUDA-graphed and keep Inductor's code for one that runs un-graphed; the
    decision's times are the ones it compared."""
    from types import SimpleNamespace

    from tdcompile import backend
    monkeypatch.setattr(backend, "_agreed_times", lambda key, m, may: (dict(AG), "cached", False))
    m = SimpleNamespace(pattern="all_gather_gemm", dtype=torch.bfloat16, world_size=4, group_name="g",
                        mnk=lambda: (4096, 2560, 5120))
    graphed = backend.decide_measured(m, charge_host=False)
    assert graphed.choice == "fused:ce" and graphed.candidates_us["fused:ce"] == 194.1
    ungraphed = backend.decide_measured(m)
    assert ungraphed.choice == "unfused" and ungraphed.candidates_us["fused:ce"] == 1000.0
    assert "host time" in ungraphed.reason


def test_cuda_graphs_option_and_the_graphed_block():
    from tdcompile.config import Options, cuda_graphed, in_cuda_graphed
    assert Options.from_mapping({"cuda_graphs": True}).cuda_graphs is True
    assert Options.from_mapping({}).cuda_graphs is None
    with pytest.raises(ValueError, match="cuda_graphs"):
        Options.from_mapping({"cuda_graphs": "yes"})
    assert not in_cuda_graphed()
    with cuda_graphed():
        with cuda_graphed():
            assert in_cuda_graphed()
        assert in_cuda_graphed()
    assert not in_cuda_graphed()
