"""A failing pass never fails the compile: whatever raises inside the tdist pipeline, the graph
is put back exactly as Inductor handed it over, compiled unrewritten, a warning names the stage
and the error, and the report lists it."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed._functional_collectives as funcol

import tdcompile
from tdcompile import backend


def mm_then_all_reduce(x, w):                                       # x [M, K], w [K, N]
    return funcol.all_reduce(torch.mm(x, w), "sum", torch.distributed.group.WORLD)


@pytest.mark.parametrize("where", ["find_all_reduce_matches", "normalize"])
def test_an_exception_inside_the_pass_leaves_the_graph_unrewritten_and_says_why(fake_pg, monkeypatch, caplog,
                                                                                 where):
    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(backend, where, boom)
    caplog.set_level(logging.WARNING, logger="tdcompile")
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    report = tdcompile.explain(mm_then_all_reduce, x, w, options={"strategy": "fused"}, fullgraph=True)
    torch._dynamo.reset()
    stage = "03 match" if where == "find_all_reduce_matches" else "01 normalize"
    assert any("tdist pass failed" in r.getMessage() and stage in r.getMessage() and "injected failure"
               in r.getMessage() for r in caplog.records)
    assert len(report.errors) == 1 and "injected failure" in report.errors[0]
    assert "warning: tdist pass failed" in str(report)
    assert not report.matches                                       # nothing was rewritten ...
    torch.testing.assert_close(report.output, x @ w)                # ... and the fake group's result is right


def test_the_restored_graph_is_the_graph_before_the_pass(fake_pg, monkeypatch):
    """The failure comes after the rewrite stage changed the graph: it is still undone."""
    import torch.fx as fx

    x, w = torch.randn(8, 16), torch.randn(16, 4)
    gm = fx.experimental.proxy_tensor.make_fx(mm_then_all_reduce)(x, w)

    def ops(g):
        return [(n.op, n.target if n.op != "placeholder" else None, len(n.args)) for n in g.nodes]

    before = ops(gm.graph)
    real_dump = backend.TdistPass._dump

    def dump(self, graph, gid, stage):            # fails once the rewrite is done
        if stage == "04.rewrite.after":
            assert any("tdist" in str(n.target) for n in graph.nodes)
            raise RuntimeError("late")
        return real_dump(self, graph, gid, stage)
    monkeypatch.setattr(backend.TdistPass, "_dump", dump)
    backend.TdistPass(tdcompile.Options(strategy="fused"))(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert ops(gm.graph) == before and "tdist" not in gm.code       # the rewrite into tdist ops was undone
    torch.testing.assert_close(gm(x, w), x @ w)


def test_a_graph_with_nothing_decided_goes_to_inductor_exactly_as_it_came(fake_pg):
    """First law by construction: when every match stays unfused, the pass hands Inductor the
    graph it received (normalize's view->reshape and copy removals undone), so tdist compiles
    the same code as plain Inductor."""
    import torch.fx as fx

    def mm_view_all_reduce(x, w):                                   # x [M, K], w [K, N]
        y = funcol.all_reduce(torch.mm(x, w), "sum", torch.distributed.group.WORLD)   # [M, N]
        return y.view(2, -1, w.shape[1])                                              # [2, M/2, N]

    x, w = torch.randn(8, 16), torch.randn(16, 4)
    for strategy, expect_same in (("unfused", True), ("fused", False)):
        gm = fx.experimental.proxy_tensor.make_fx(mm_view_all_reduce, tracing_mode="fake")(x, w)
        before = gm.graph.python_code("self").src
        assert "view" in before
        backend.TdistPass(tdcompile.Options(strategy=strategy))(gm.graph)
        gm.graph.lint()
        assert (gm.graph.python_code("self").src == before) is expect_same, strategy
