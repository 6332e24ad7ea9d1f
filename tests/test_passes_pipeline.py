"""The tdist pass as a whole: options, decisions, dumps, the ``torch.compile`` path, and the
numerics of every rewrite on 2 gloo ranks (harness: ``toy_passes``).

* options: unknown options/strategies are rejected naming the valid ones; ``unfused`` rewrites
  nothing; ``auto`` decides from the device profile; ``dump_dir`` writes each pipeline stage; the
  pass uuid changes with the options;
* through ``torch.compile(backend="tdist")`` / ``tdcompile.explain``: module paths in the report,
  options plumbing, Inductor lowering of the fused ops;
* numerics: the original and the rewritten graph module of each toy (``toy_passes.numerics_cases``)
  compute the same values on 2 real gloo ranks.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tdcompile
from tdcompile.backend import TdistPass
from tdcompile.config import Options

import gloo_ranks
import toy_passes
from toy_passes import (B, K, N, S, NUMERICS_CASES, W, all_gather, all_reduce, collectives,
                        make_tp_layer, mm_all_reduce_3d, r, reduce_scatter, rewrite, run_pass, tdist_ops,
                        tp_layer_inputs, trace)


# ============================================================================ options, decisions, dumps
def test_unknown_option_is_rejected_with_the_list_of_valid_options():
    with pytest.raises(ValueError) as e:
        Options.from_mapping({"strategy": "fused", "fuse_everything": True})
    msg = str(e.value)
    assert "fuse_everything" in msg
    for key in ("strategy", "dump_dir", "profile", "min_sp_rows", "sequence_parallel"):
        assert key in msg


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="strategy.* must be one of"):
        Options.from_mapping({"strategy": "fastest"})
    with pytest.raises(ValueError, match="sequence_parallel.* must be one of"):
        Options.from_mapping({"sequence_parallel": True})
    assert Options.from_mapping({"sequence_parallel": "always"}).sequence_parallel == "always"


@pytest.mark.parametrize("bad", [-0.1, 0.5, "5%", True])
def test_margin_is_none_or_a_fraction_below_one_half(bad):
    assert Options.from_mapping({"margin": 0.05}).margin == 0.05
    assert Options.from_mapping({}).margin is None
    with pytest.raises(ValueError, match="margin"):
        Options.from_mapping({"margin": bad})


def test_bench_column_tdist_margin_sets_the_margin_option():
    from argparse import Namespace

    from tdcompile.bench_cases import compiler
    backend, options = compiler("tdist:margin5", Namespace(strategy="auto", profile=None))
    assert backend == "tdist" and options["margin"] == 0.05 and Options.from_mapping(options).margin == 0.05


def test_torch_compile_with_an_unknown_option_fails_and_names_it(fake_pg):
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + 1, backend="tdist", options={"bogus": 1})
    with pytest.raises(Exception, match="valid options"):
        fn(torch.ones(2))
    torch._dynamo.reset()


def test_strategy_unfused_rewrites_nothing(fake_pg):
    before, after, report, _ = rewrite(make_tp_layer(B, S), *tp_layer_inputs(B, S), strategy="unfused")
    assert not tdist_ops(after)
    assert collectives(after) == collectives(before) and after["aten.mm"] == before["aten.mm"]
    assert [d.pattern for d in report.matches].count("gemm_all_reduce") == 2   # o_proj and down_proj
    assert all(d.choice == "unfused" and not d.rewritten for d in report.matches)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default profile is the GPU's")
def test_auto_on_cpu_without_a_profile_keeps_everything_unfused_and_says_why(fake_pg):
    _, after, report, _ = rewrite(make_tp_layer(B, S), *tp_layer_inputs(B, S), strategy="auto")
    assert not tdist_ops(after) and after["c10d.all_reduce"] == 2
    assert [d.pattern for d in report.matches].count("gemm_all_reduce") == 2
    for d in report.matches:
        assert d.choice == "unfused" and "profile" in d.reason and d.predicted_us == {}


def _profile_file(tmp_path, **constants) -> str:
    """A device profile (JSON path) that differs from the shipped h200 one by ``constants``."""
    import dataclasses

    from tdcompile import cost_model

    path = str(tmp_path / "profile.json")
    dataclasses.replace(cost_model.DeviceProfile.load("h200"), **constants).save(path)
    return path


@pytest.mark.parametrize("constants,expected", [
    (dict(p2p_latency_us=1e6, link_gbps=1e-3), "unfused"),                   # our P2P kernels hopelessly slow
    (dict(nccl_latency_us=1e6, nccl_gbps=1e-3, p2p_latency_us=0.0), "fused"),  # NCCL hopelessly slow
], ids=["slow_p2p_keeps_unfused", "slow_nccl_fuses"])
def test_auto_with_a_profile_picks_the_candidate_the_profile_makes_cheaper(fake_pg, tmp_path, constants, expected):
    _, after, report, _ = rewrite(mm_all_reduce_3d, r(B, S, K), r(K, N), strategy="auto",
                                  profile=_profile_file(tmp_path, **constants),
                                  min_sp_rows=10**9)   # keep the sequence-parallel rewrite out of this one
    (d,) = report.matches
    assert d.choice == expected
    assert {"fused", "unfused"} <= set(d.predicted_us)
    assert d.predicted_us[expected] < d.predicted_us["fused" if expected == "unfused" else "unfused"]
    assert (tdist_ops(after) == {"tdist.gemm_all_reduce": 1}) == (expected == "fused")
    assert d.rewritten == (expected == "fused")


def test_dump_dir_writes_each_stage_named_by_pipeline_position(fake_pg, tmp_path):
    gm = trace(make_tp_layer(B, S), *tp_layer_inputs(B, S))
    run_pass(gm, strategy="fused", dump_dir=str(tmp_path))
    (gdir,) = (tmp_path / "rank0").iterdir()
    assert gdir.name.startswith("graph")
    assert sorted(p.name for p in gdir.iterdir()) == [
        "00.input.py", "01.normalize.after.py", "03.match.txt", "04.rewrite.after.py"]
    assert "_c10d_functional.all_reduce" in (gdir / "00.input.py").read_text()
    assert "aten.view" not in (gdir / "01.normalize.after.py").read_text()
    assert len(re.findall(r"\bgemm_all_reduce\b", (gdir / "03.match.txt").read_text())) == 2
    after = (gdir / "04.rewrite.after.py").read_text()
    assert after.count("torch.ops.tdist.") == 2 and "_c10d_functional.all_reduce" not in after


def test_dump_dir_includes_the_sequence_parallel_stage_when_it_runs(fake_pg, tmp_path):
    gm = trace(make_tp_layer(B, S), *tp_layer_inputs(B, S))
    run_pass(gm, strategy="sequence_parallel", dump_dir=str(tmp_path))
    (gdir,) = (tmp_path / "rank0").iterdir()
    names = sorted(p.name for p in gdir.iterdir())
    assert names == ["00.input.py", "01.normalize.after.py", "02.sequence_parallel.after.py", "03.match.txt",
                     "04.rewrite.after.py"]
    assert "reduce_scatter_tensor" in (gdir / "02.sequence_parallel.after.py").read_text()


def test_pass_uuid_is_stable_and_changes_with_the_options():
    def uuid(**kw):
        return TdistPass(Options(**kw)).uuid()

    assert uuid() == uuid()
    assert uuid(strategy="fused") == uuid(strategy="fused")
    variants = [uuid(), uuid(strategy="fused"), uuid(strategy="unfused"), uuid(strategy="sequence_parallel"),
                uuid(dump_dir="/tmp/x"), uuid(profile="h200"), uuid(profile="h100"), uuid(min_sp_rows=64)]
    assert len(set(variants)) == len(variants)


# ============================================================================ through torch.compile
class RowParallelAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.o_proj = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return all_reduce(self.o_proj(x))


class SequenceParallelMLP(nn.Module):
    """Gather [B, S/W, 8] on dim 1 -> gate/up -> down (with bias) -> scatter on dim 1."""
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(8, 12, bias=False)
        self.up_proj = nn.Linear(8, 12, bias=False)
        self.down_proj = nn.Linear(12, 8, bias=True)

    def forward(self, x):
        g = all_gather(x, dim=1)
        return reduce_scatter(self.down_proj(F.silu(self.gate_proj(g)) * self.up_proj(g)), dim=1)


class Sync(nn.Module):
    def forward(self, x):
        return all_reduce(x * 2.0)


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = RowParallelAttention()
        self.mlp = SequenceParallelMLP()
        self.sync = Sync()

    def forward(self, x):                    # x [2, 4, 16]
        h = self.attn(x)                     # [2, 4, 8]
        return self.sync(self.mlp(h[:, :2]))  # this rank's half of the sequence -> [2, 2, 8]


@pytest.fixture(scope="module")
def explained(fake_pg, tmp_path_factory):
    """One real compile (Dynamo -> AOT -> Inductor post-grad -> TdistPass -> Inductor) of ToyBlock."""
    dump = tmp_path_factory.mktemp("dump")
    torch.manual_seed(0)
    report = tdcompile.explain(ToyBlock(), torch.randn(2, 4, 16), options={"strategy": "fused", "dump_dir": str(dump)})
    torch._dynamo.reset()
    return report, dump


def test_explain_reports_every_pattern_with_its_module_path_and_shape(explained):
    report, _ = explained
    got = {(d.pattern, d.module, d.shape, d.choice) for d in report.matches}
    assert got == {
        ("gemm_all_reduce", "attn.o_proj", (8, 8, 16), "fused"),
        ("all_gather_gemm", "mlp", (8, 24, 8), "fused"),           # gate + up: N = 12 + 12
        ("gemm_reduce_scatter", "mlp.down_proj", (8, 8, 12), "fused"),
        ("all_reduce", "sync", (4, 8, 0), "fused"),
    }
    agg = report.by_pattern("all_gather_gemm")[0]
    assert agg.match.describe() == "2 weights (gate_proj, up_proj)"
    assert all(d.rewritten and d.reason.startswith("strategy='fused'") for d in report.matches)


def test_explain_shows_the_graph_before_and_after_and_a_table(explained):
    report, _ = explained
    assert len(report.graphs) == 1
    before, after = report.graphs[0]
    assert "_c10d_functional.all_reduce" in before and "tdist." not in before
    for op in ("gemm_all_reduce", "all_gather_gemm", "gemm_reduce_scatter", "all_reduce"):
        assert f"torch.ops.tdist.{op}.default" in after
    assert "_c10d_functional" not in after
    text = str(report)
    assert "attn.o_proj" in text and "mlp.down_proj" in text and "4 matches, 4 rewritten" in text
    assert [row["module"] for row in json.loads(report.to_json())] == [d.module for d in report.matches]


def test_backend_dump_dir_option_reaches_the_pass(explained):
    _, dump = explained
    files = {p.name for p in dump.glob("rank0/graph*/*")}
    assert {"00.input.py", "01.normalize.after.py", "03.match.txt", "04.rewrite.after.py"} <= files


class RowParallelPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.o_proj = nn.Linear(16, 8, bias=True)
        self.down_proj = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        h = all_reduce(self.o_proj(x))
        return all_reduce(self.down_proj(F.gelu(h))) + h


def test_compiled_gemm_all_reduce_matches_eager_through_inductor(fake_pg):
    # On the fake group all_reduce leaves data untouched in eager, in the reference op and in
    # Inductor's lowering alike, so this checks GEMM + bias + reshapes + Inductor's handling of the op.
    torch.manual_seed(0)
    m, x = RowParallelPair(), torch.randn(2, 3, 16)
    with torch.no_grad():
        eager = m(x)
    report = tdcompile.explain(m, x, options={"strategy": "fused"})
    torch._dynamo.reset()
    assert [d.pattern for d in report.matches] == ["gemm_all_reduce", "gemm_all_reduce"]
    assert all(d.rewritten for d in report.matches)
    torch.testing.assert_close(report.output, eager, rtol=1e-5, atol=1e-5)


# ============================================================================ numerics on 2 gloo ranks
@pytest.fixture(scope="module")
def gloo_numerics():
    return gloo_ranks.collect(gloo_ranks.start(toy_passes.__file__, W))  # python tests/toy_passes.py RANK RDZV


@pytest.mark.parametrize("case", NUMERICS_CASES)
def test_rewritten_graph_computes_the_same_values_on_two_gloo_ranks(gloo_numerics, case):
    for rank, res in enumerate(gloo_numerics):
        got = res[case]
        assert "error" not in got, f"rank {rank}: {got.get('error')}"
        assert got["rewritten"] >= 1 and got["tdist_ops"] >= 1, f"rank {rank}: nothing was rewritten"
        assert got["max_abs_diff"] <= 1e-4, f"rank {rank}: max abs diff {got['max_abs_diff']}"
