"""``all_reduce -> + residual -> RMSNorm`` => ``tdist.all_reduce_rmsnorm``: which graphs match
(issue 10, item 3; toy models on the fake 2-rank group; harness: ``rmsnorm_toys``).

* a row-parallel linear's all_reduce, the residual add and HF's RMSNorm become one op returning
  (normed, new residual), in fp32/bf16/fp16, through reshapes, for every residual add feeding a
  norm in a decoder stack;
* almost-RMSNorms (variance used elsewhere, no weight, eps outside the sqrt, bias after the
  reduce), a ``max`` reduce and dtype mismatches stay unfused, logging why;
* the rewritten graph runs and equals the unrewritten one; dynamic rows match with M unknown, a
  lifted (graph-input) eps does not match.
"""
from __future__ import annotations

import functools

import pytest
import torch

from tdcompile.passes.all_reduce_rmsnorm import AllReduceRMSNormMatch

from rmsnorm_toys import (B, H, S, W, BiasAfterReduce, EpsOutsideSqrt, Fp32ResidualBf16Reduce, NormOnFlattenedSum,
                          NormWithOtherUser, NormWithoutWeight, ReshapedReduce, ToyDecoder, compile_post_grad,
                          make_pass, post_grad_backend, toy_inputs, toy_model)


# ============================================================================ structure (fake group)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduce_add_norm_becomes_one_op_returning_norm_and_residual(fake_pg, dtype):
    model = toy_model(dtype=dtype)
    (g,), _ = compile_post_grad(model, *toy_inputs(dtype))
    before, after = g["before"], g["after"]
    assert before["c10d.all_reduce"] == 1 and before["aten.rsqrt"] == 1
    assert (before["prims.convert_element_type"] > 0) == (dtype != torch.float32)   # .to() vanishes in fp32
    assert after["tdist.all_reduce_rmsnorm"] == 1
    assert "c10d.all_reduce" not in after and "c10d.wait_tensor" not in after
    for op in ("aten.rsqrt", "aten.pow", "aten.mean", "aten.add"):
        assert op not in after, op
    assert after["aten.mm"] == 1                                  # the GEMM is left alone
    (m,) = g["matches"]
    assert (m["module"], m["source"], m["shape"], m["eps"], m["dtype"]) == ("norm", "o_proj", (B * S, H, 0), 1e-6,
                                                                           dtype)
    assert (m["group"], m["world"]) == (fake_pg, W)
    assert m["detail"] == "after o_proj, eps=1e-06"
    (match,) = g["objs"]
    assert isinstance(match, AllReduceRMSNormMatch) and match.pattern == "all_reduce_rmsnorm"


def test_both_outputs_are_rerouted_to_the_op(fake_pg):
    (g,), _ = compile_post_grad(toy_model(), *toy_inputs())
    assert "torch.ops.tdist.all_reduce_rmsnorm.default(" in g["code"] and "'fused')" in g["code"]
    assert g["outputs"] == ["op[0]", "op[1]"]                    # (normed, new residual)


def test_reshape_between_wait_and_add_reshapes_the_op_input(fake_pg):
    (g,), _ = compile_post_grad(toy_model(ReshapedReduce), *toy_inputs())
    assert g["after"]["tdist.all_reduce_rmsnorm"] == 1 and "c10d.all_reduce" not in g["after"]
    assert g["matches"][0]["shape"] == (B * S, H, 0)


def test_norm_on_a_reshaped_sum_gets_the_op_output_reshaped(fake_pg):
    (g,), out = compile_post_grad(toy_model(NormOnFlattenedSum), *toy_inputs())
    assert g["after"]["tdist.all_reduce_rmsnorm"] == 1 and "c10d.all_reduce" not in g["after"]
    assert [tuple(o.shape) for o in out] == [(B * S, H), (B, S, H)]


def test_every_residual_add_feeding_a_norm_in_a_decoder_stack_is_matched(fake_pg):
    (g,), _ = compile_post_grad(toy_model(ToyDecoder, layers=3), torch.randn(B, S, H))
    assert [(m["module"], m["source"]) for m in g["matches"]] == [
        ("layers.0.post_attention_layernorm", "layers.0.o_proj"), ("layers.1.input_layernorm", "layers.0.down_proj"),
        ("layers.1.post_attention_layernorm", "layers.1.o_proj"), ("layers.2.input_layernorm", "layers.1.down_proj"),
        ("layers.2.post_attention_layernorm", "layers.2.o_proj"), ("norm", "layers.2.down_proj")]
    assert g["after"]["tdist.all_reduce_rmsnorm"] == 6 and "c10d.all_reduce" not in g["after"]
    assert g["after"]["aten.rsqrt"] == 1                          # only layer 0's input norm stays


@pytest.mark.parametrize("cls,reason", [
    (NormWithOtherUser, "(variance) has 2 users"),
    (NormWithoutWeight, "no weight"),
    (EpsOutsideSqrt, "is not variance + eps"),
    (BiasAfterReduce, "broadcasts"),
], ids=["variance_used_elsewhere", "missing_weight", "eps_outside_sqrt", "bias_after_reduce"])
def test_almost_rmsnorm_stays_unfused_and_logs_why(fake_pg, pass_log, cls, reason):
    (g,), _ = compile_post_grad(toy_model(cls), *toy_inputs())
    assert g["matches"] == [] and g["after"]["c10d.all_reduce"] == 1 and "tdist.all_reduce_rmsnorm" not in g["after"]
    assert "no all_reduce_rmsnorm fusion" in pass_log.text and reason in pass_log.text, pass_log.text


def test_max_reduce_stays_unfused_and_logs_the_reduce_op(fake_pg, pass_log):
    (g,), _ = compile_post_grad(toy_model(op="max"), *toy_inputs())
    assert g["matches"] == [] and g["after"]["c10d.all_reduce"] == 1
    assert "reduce op 'max'" in pass_log.text


def test_dtype_mismatch_between_residual_and_reduced_value_stays_unfused(fake_pg, pass_log):
    (g,), _ = compile_post_grad(toy_model(Fp32ResidualBf16Reduce), *toy_inputs())
    assert g["matches"] == [] and g["after"]["c10d.all_reduce"] == 1
    assert "dtype mismatch" in pass_log.text


def test_weight_in_a_different_dtype_stays_unfused(fake_pg, pass_log):
    model = toy_model(dtype=torch.bfloat16)
    model.norm.float()                                           # fp32 weight * bf16 -> fp32 output
    (g,), _ = compile_post_grad(model, *toy_inputs(torch.bfloat16))
    assert g["matches"] == [] and "dtype mismatch: weight torch.float32" in pass_log.text


def test_rewritten_graph_runs_and_equals_the_unrewritten_graph_on_the_fake_group(fake_pg):
    model, inputs = toy_model(ToyDecoder), (torch.randn(B, S, H),)
    _, want = compile_post_grad(model, *inputs, rewrite=False)
    _, got = compile_post_grad(model, *inputs)
    assert torch.equal(want, got)


def test_dynamic_rows_after_a_recompile_are_matched_with_m_unknown(fake_pg):
    """Automatic dynamic shapes (the default): the second token count recompiles with symbolic rows."""
    model = toy_model(ToyDecoder)
    cap = make_pass(True, "fused")
    torch._dynamo.reset()
    fn = torch.compile(model, backend=functools.partial(post_grad_backend, cap=cap), fullgraph=True)
    with torch.no_grad():
        for b, s in ((2, 4), (3, 5), (4, 7)):   # size 1 would specialize
            x = torch.randn(b, s, H)
            torch.testing.assert_close(fn(x), model(x), rtol=0, atol=0)
    torch._dynamo.reset()
    assert [[m["shape"] for m in g["matches"]] for g in cap.graphs] == [[(B * S, H, 0)] * 4, [(None, H, 0)] * 4]
    assert all(g["after"]["tdist.all_reduce_rmsnorm"] == 4 for g in cap.graphs)


def test_dynamic_true_lifts_eps_into_a_graph_input_and_stays_unfused(fake_pg, pass_log):
    """``dynamic=True`` makes Dynamo pass the float ``variance_epsilon`` as a graph input (a 0-d
    tensor, ``specialize_float=False``): eps is unknown at compile time, the op takes a float."""
    model = toy_model()
    cap = make_pass(True, "fused")
    torch._dynamo.reset()
    fn = torch.compile(model, backend=functools.partial(post_grad_backend, cap=cap), fullgraph=True, dynamic=True)
    with torch.no_grad():
        fn(*toy_inputs())
    torch._dynamo.reset()
    assert [g["matches"] for g in cap.graphs] == [[]]
    assert "is not a constant number" in pass_log.text
