"""The command line and the report, as a newcomer meets them (fast: nothing here compiles a model).

* bad values are rejected up front, in one line, before any rank starts or any model is built;
* every flag of every command is documented in plain text;
* ``inspect`` prints the rewrite report and nothing timed; ``demo`` adds compiled vs eager;
* the report says what happened (sequence parallel yes/no, ``-`` for matches outside modules),
  and graph ids restart at 0 for each ``tdcompile.explain()``.
"""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import tdcompile
from tdcompile import cli, launch
from tdcompile.cost_model import Decision
from tdcompile.passes.match import Decided
from tdcompile.report import Report

BAD = {
    "unknown strategy": ["demo", "--strategy", "bogus"],
    "unknown profile": ["inspect", "--profile", "no-such-gpu"],
    "unknown model": ["bench", "--model", "llama"],
    "unknown dtype": ["demo", "--dtype", "int8"],
    "unknown plan": ["generate", "--plan", "megatron"],
    "zero batch": ["generate", "--batch", "0"],
    "zero ranks": ["inspect", "--nproc", "0"],
    "zero bench rounds": ["bench", "--rounds", "0"],
    "not an int": ["demo", "--seq", "abc"],
    "missing checkpoint": ["demo", "--checkpoint", "/no/such/dir"],
    "torch_sp with a sequence the ranks cannot split": ["inspect", "--plan", "torch_sp", "--seq", "15"],
}


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if the CLI gets as far as starting ranks."""
    def run(*a, **k):
        raise AssertionError("ranks were started: the bad value was not rejected up front")
    monkeypatch.setattr(launch, "run", run)


@pytest.mark.parametrize("argv", BAD.values(), ids=BAD.keys())
def test_bad_values_are_rejected_up_front_in_one_line(argv, nothing_starts, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"tdcompile {argv[0]}: error: ") and f"'tdcompile {argv[0]} --help'" in err


def test_the_strategy_error_lists_the_valid_strategies(nothing_starts, capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--strategy", "bogus"])
    err = capsys.readouterr().err
    for strategy in ("auto", "unfused", "fused", "symm_mem", "sequence_parallel", "bound"):
        assert strategy in err


def _subparsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    return parser, sub.choices


@pytest.mark.parametrize("cmd", cli.COMMANDS)
def test_every_flag_is_documented_in_plain_text(cmd):
    _, commands = _subparsers()
    p = commands[cmd]
    text = p.format_help()
    for action in p._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"tdcompile {cmd} {'/'.join(action.option_strings)} has no help text"
    assert "``" not in text and ":func:" not in text and "seed's" not in text


def test_the_top_level_help_names_every_command():
    parser, commands = _subparsers()
    text = parser.format_help()
    assert set(commands) == {"demo", "inspect", "generate", "bench", "calibrate"}
    assert all(c in text for c in commands) and "``" not in text


def test_a_subcommand_that_fails_to_import_fails_the_cli_loudly():
    code = "import sys; sys.modules['tdcompile.bench'] = None; import tdcompile.cli"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "tdcompile.bench" in proc.stderr.splitlines()[-1]


# ------------------------------------------------------------------ inspect vs demo
def _stub_report(model, ids, **kwargs) -> Report:
    """What ``tdcompile.explain`` returns for one rewritten down_proj (no compile: fast)."""
    match = SimpleNamespace(pattern="gemm_all_reduce", module="model.layers.0.mlp.down_proj", dtype=torch.float32,
                            mnk=lambda: (8, 256, 256), describe=lambda: "")
    decision = Decision("fused", {"unfused": 37.6, "fused": 11.5}, "predicted: fused 3.27x faster", "predicted")
    report = Report(matches=[Decided(match, decision, graph_id=0, rewritten=True)], graphs=[("before", "after")],
                    graph_decisions=[(0, Decision("all_reduce", {}, "strategy='fused'"))])
    with torch.no_grad():
        report.output = model(ids, use_cache=False)
    return report


@pytest.fixture
def one_rank_no_compile(monkeypatch):
    """Ranks: this process only (no group); explain: the stub above."""
    monkeypatch.setattr(launch, "run", lambda fn, nproc, *args: fn(torch.device("cpu"), *args))
    monkeypatch.setattr(tdcompile, "explain", _stub_report)


TINY = ["--nproc", "1", "--layers", "1", "--batch", "1", "--seq", "4", "--plan", "none"]


def test_inspect_prints_the_report_and_nothing_timed(one_rank_no_compile, capsys):
    cli.main(["inspect", *TINY, "--show-graph"])
    out = capsys.readouterr().out
    assert "== rewrite report ==" in out
    assert "model.layers.0.mlp.down_proj" in out and "unfused 37.6, fused 11.5" in out and "predicted" in out
    assert "graph 0: sequence parallel: no (strategy='fused')" in out
    assert "== graph 0 after the rewrite ==" in out
    assert "compiled vs eager" not in out and "max |" not in out and " ms" not in out and "speedup" not in out


def test_demo_adds_compiled_vs_eager(one_rank_no_compile, capsys):
    cli.main(["demo", *TINY])
    out = capsys.readouterr().out
    assert "== rewrite report ==" in out and "== compiled vs eager ==" in out and "max |tdist - eager TP|" in out


def test_inspect_says_what_it_is_doing(one_rank_no_compile, capsys):
    cli.main(["inspect", *TINY])
    out = capsys.readouterr().out
    assert "building 1-layer Qwen3" in out and "built in" in out and "compiling with tdist" in out


# ------------------------------------------------------------------ report wording
def test_a_graph_without_all_reduce_says_sequence_parallel_no_and_why():
    report = Report(graph_decisions=[(0, Decision("all_reduce", {}, "no all_reduce in the graph"))])
    text = str(report)
    assert "graph 0: sequence parallel: no (no all_reduce in the graph)" in text
    assert "all_reduce (" not in text
    assert "no communication pattern matched" in text


def test_sequence_parallel_applied_says_yes_with_its_predictions():
    d = Decision("sequence_parallel", {"all_reduce": 91.2, "sequence_parallel": 81.6}, "predicted 1.12x faster")
    assert "graph 3: sequence parallel: yes (predicted 1.12x faster; predicted us: all_reduce 91.2, " \
           "sequence_parallel 81.6)" in str(Report(graph_decisions=[(3, d)]))


def test_a_match_outside_any_module_shows_a_dash_not_a_question_mark():
    match = SimpleNamespace(pattern="all_reduce", module="?", dtype=torch.bfloat16, mnk=lambda: (4, 8, 0),
                            describe=lambda: "")
    report = Report(matches=[Decided(match, Decision("unfused", {}, "no profile"), graph_id=0)])
    row = report.rows()[0]
    assert row["module"] == "-" and row["K"] == "-" and row["dtype"] == "bfloat16"
    header = str(report).splitlines()[0].split()
    assert header[:7] == ["graph", "pattern", "module", "M", "N", "K", "dtype"]
    assert "candidates" in header and "source" in header and "reason" in header and "?" not in str(report)


def test_graph_ids_restart_at_zero_for_each_explain(fake_pg):
    def sync(x):                                           # a plain function: no module, no kernel to compile
        return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", fake_pg))

    x = torch.randn(4, 8)
    first = tdcompile.explain(sync, x, options={"strategy": "fused"})
    second = tdcompile.explain(sync, x, options={"strategy": "fused"})
    torch._dynamo.reset()
    assert [d.graph_id for d in first.matches] == [d.graph_id for d in second.matches] == [0]
    assert [gid for gid, _ in second.graph_decisions] == [0]
    assert second.rows()[0]["module"] == "-"
