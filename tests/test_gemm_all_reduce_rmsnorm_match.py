"""``GEMM -> all_reduce -> + residual -> RMSNorm`` => ``tdist.gemm_all_reduce_rmsnorm``: the
all-reduce + norm fusion with the GEMM that feeds it inside the op, so that the fused variants
can let cuBLAS write into the symmetric buffer (zero copy).  Toy models on the fake 2-rank group
(harness: ``rmsnorm_toys``, ``gemm=True``).

* a row-parallel linear, its all_reduce, the residual add and HF's RMSNorm become one op, in
  fp32/bf16/fp16, through reshapes, for every GEMM-fed residual add in a decoder stack;
* the match carries the GEMM's (M, N, K); the rewritten graph equals the unrewritten one;
* a GEMM whose output has another user is not taken in (it must still run), logging why;
* dynamic rows match with M unknown.
"""
from __future__ import annotations

import functools

import pytest
import torch

from tdcompile.passes.gemm_all_reduce_rmsnorm import GemmAllReduceRMSNormMatch

from rmsnorm_toys import (B, H, K, S, GemmOutputUsedTwice, NormOnFlattenedSum, ReshapedReduce, ToyDecoder,
                          compile_post_grad, make_pass, post_grad_backend, toy_inputs, toy_model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemm_reduce_add_norm_becomes_one_op(fake_pg, dtype):
    (g,), _ = compile_post_grad(toy_model(dtype=dtype), *toy_inputs(dtype), gemm=True)
    before, after = g["before"], g["after"]
    assert before["aten.mm"] == 1 and before["c10d.all_reduce"] == 1 and before["aten.rsqrt"] == 1
    assert after["tdist.gemm_all_reduce_rmsnorm"] == 1
    for op in ("aten.mm", "c10d.all_reduce", "c10d.wait_tensor", "aten.rsqrt", "aten.pow", "aten.mean", "aten.add"):
        assert op not in after, op
    (m,) = g["matches"]
    assert (m["module"], m["source"], m["shape"], m["dtype"]) == ("norm", "o_proj", (B * S, H, K), dtype)
    assert m["detail"] == "o_proj GEMM in the op, eps=1e-06"
    (match,) = g["objs"]
    assert isinstance(match, GemmAllReduceRMSNormMatch) and match.pattern == "gemm_all_reduce_rmsnorm"
    assert g["outputs"] == ["op[0]", "op[1]"]                    # (normed, new residual)


@pytest.mark.parametrize("cls", [ToyDecoder, ReshapedReduce, NormOnFlattenedSum],
                         ids=["decoder_stack", "reshape_after_wait", "norm_on_reshaped_sum"])
def test_rewritten_graph_equals_the_unrewritten_graph(fake_pg, cls):
    model = toy_model(cls)
    inputs = (torch.randn(B, S, H),) if cls is ToyDecoder else toy_inputs()
    _, want = compile_post_grad(model, *inputs, rewrite=False)
    (g,), got = compile_post_grad(model, *inputs, gemm=True)
    assert "c10d.all_reduce" not in g["after"] and "aten.mm" not in g["after"]
    for w, o in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        assert w.shape == o.shape
        torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6)


def test_every_gemm_fed_residual_add_in_a_decoder_stack_is_matched(fake_pg):
    (g,), _ = compile_post_grad(toy_model(ToyDecoder, layers=3), torch.randn(B, S, H), gemm=True)
    assert [m["source"] for m in g["matches"]] == ["layers.0.o_proj", "layers.0.down_proj", "layers.1.o_proj",
                                                   "layers.1.down_proj", "layers.2.o_proj", "layers.2.down_proj"]
    assert all(m["shape"] == (B * S, H, H) for m in g["matches"])
    assert g["after"]["tdist.gemm_all_reduce_rmsnorm"] == 6 and "aten.mm" not in g["after"]


def test_a_gemm_whose_output_has_another_user_is_not_taken_in(fake_pg, pass_log):
    (g,), _ = compile_post_grad(toy_model(GemmOutputUsedTwice), *toy_inputs(), gemm=True)
    assert g["matches"] == [] and g["after"]["aten.mm"] == 1
    assert "no gemm_all_reduce_rmsnorm fusion" in pass_log.text and "has 2 users" in pass_log.text
    (g,), _ = compile_post_grad(toy_model(GemmOutputUsedTwice), *toy_inputs())      # the norm fusion still applies
    assert g["after"]["tdist.all_reduce_rmsnorm"] == 1 and g["after"]["aten.mm"] == 1


def test_dynamic_rows_match_with_m_unknown(fake_pg):
    model = toy_model(ToyDecoder)
    cap = make_pass(True, "fused", gemm=True)
    torch._dynamo.reset()
    fn = torch.compile(model, backend=functools.partial(post_grad_backend, cap=cap), fullgraph=True)
    with torch.no_grad():
        for b, s in ((2, 4), (3, 5), (4, 7)):   # size 1 would specialize
            x = torch.randn(b, s, H)
            torch.testing.assert_close(fn(x), model(x), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
    assert [[m["shape"] for m in g["matches"]] for g in cap.graphs] == [[(B * S, H, H)] * 4, [(None, H, H)] * 4]
