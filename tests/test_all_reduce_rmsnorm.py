"""``all_reduce -> + residual -> RMSNorm`` => ``tdist.all_reduce_rmsnorm`` (issue 10, item 3).

Harness: the model goes through ``torch.compile`` -- Dynamo, AOT, Inductor's joint-graph and
post-grad passes -- and at Inductor's ``post_grad_custom_post_pass`` (where the tdist pass runs)
``normalize`` + ``find_all_reduce_rmsnorm_matches`` run and the matches are rewritten. The
post-grad graph is then executed as it is, without Inductor's C++ code generation (seconds
instead of ~20 s per model); the full backend is exercised by the wiring tests at the end.

* structure: toy decoder layers (``nn.Linear`` -> functional all_reduce -> ``residual + x`` ->
  HF's own ``Qwen3RMSNorm``) on the fake 2-rank group, and negative cases with the logged reason;
* numerics: 2 gloo ranks (this file is the worker: ``python tests/test_all_reduce_rmsnorm.py RANK PORT``)
  run the toys (bitwise equal to eager, the op is HF's arithmetic) and the unmodified tiny HF
  Qwen3 and Llama under HF's ``tp_plan`` (2 matches per layer; the last one feeds ``model.norm``).
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import socket
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import tdcompile  # noqa: F401  (registers torch.ops.tdist.*)
from tdcompile import backend as tdist_backend
from tdcompile.passes.all_reduce_rmsnorm import AllReduceRMSNormMatch, find_all_reduce_rmsnorm_matches
from tdcompile.passes.normalize import normalize

c10d = torch.ops._c10d_functional
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = 2
B, S, K, H = 2, 4, 16, 8          # activations [B, S, K] -> row-parallel linear -> [B, S, H]


# ============================================================================ harness
def _group() -> str:
    return dist.group.WORLD.group_name


def all_reduce(x, op="sum"):
    return c10d.wait_tensor(c10d.all_reduce(x, op, _group()))


def op_counts(graph) -> Counter:
    out = Counter()
    for n in graph.nodes:
        if n.op == "call_function":
            t = n.target
            name = str(t.overloadpacket) if isinstance(t, torch._ops.OpOverload) else t.__name__
            out[name.replace("_c10d_functional.", "c10d.")] += 1
    return out


def _describe(n) -> str:
    """``"op[i]"`` for ``getitem(tdist.all_reduce_rmsnorm(...), i)``, else the node's target."""
    import operator

    if isinstance(n, torch.fx.Node) and n.target is operator.getitem and \
            n.args[0].target is torch.ops.tdist.all_reduce_rmsnorm.default:
        return f"op[{n.args[1]}]"
    return str(getattr(n, "target", n))


class _FindAndRewrite:
    """Stands where ``TdistPass`` stands (Inductor's post_grad_custom_post_pass)."""

    def __init__(self, rewrite: bool, impl: str):
        self.rewrite, self.impl, self.graphs = rewrite, impl, []

    def __call__(self, graph):
        normalize(graph)
        before = op_counts(graph)
        matches = find_all_reduce_rmsnorm_matches(graph)
        infos = [{"module": m.module, "source": m.source, "shape": m.mnk(), "eps": m.eps, "dtype": m.dtype,
                  "group": m.group_name, "world": m.world_size, "detail": m.describe()} for m in matches]
        if self.rewrite:
            for m in matches:
                m.replace_with(graph, impl=self.impl)
            graph.lint()
        self.graphs.append({"before": before, "after": op_counts(graph), "matches": infos,
                            "objs": matches, "code": graph.python_code("self").src,
                            "outputs": [_describe(a) for a in graph.output_node().args[0]]})

    def uuid(self):
        return None


def _make_pass(rewrite, impl):
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class P(_FindAndRewrite, CustomGraphPass):
        pass
    return P(rewrite, impl)


def _post_grad_backend(gm, example_inputs, *, cap):
    from functorch.compile import make_boxed_func
    from torch._inductor.compile_fx import _recursive_post_grad_passes, compile_fx

    def inner(g, inputs, **kw):   # Inductor's post-grad passes (ours among them), then run the ATen graph
        _recursive_post_grad_passes(g, is_inference=kw.get("is_inference", False))
        return make_boxed_func(g.forward)

    return compile_fx(gm, example_inputs, inner_compile=inner,
                      config_patches={"post_grad_custom_post_pass": cap, "force_disable_caches": True})


def compile_post_grad(model, *args, rewrite=True, impl="fused", **kwargs):
    """Returns (the pass record: one dict per graph, the compiled output)."""
    cap = _make_pass(rewrite, impl)
    torch._dynamo.reset()
    fn = torch.compile(model, backend=functools.partial(_post_grad_backend, cap=cap), fullgraph=True)
    with torch.no_grad():
        out = fn(*args, **kwargs)
    torch._dynamo.reset()
    return cap.graphs, out


# ============================================================================ toy models
class Qwen3RMSNorm(nn.Module):
    """A verbatim copy of transformers' ``Qwen3RMSNorm`` (= ``LlamaRMSNorm``; checked by
    ``test_toy_norm_is_a_verbatim_copy_of_hf``), so the gloo workers need not import transformers."""

    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RowParallelResidualNorm(nn.Module):
    """HF's decoder-layer tail: row-parallel linear -> all_reduce -> ``residual + x`` -> RMSNorm.
    Returns (normed, new residual) like the layer does."""

    def __init__(self, norm_cls=Qwen3RMSNorm, eps=1e-6, op="sum"):
        super().__init__()
        self.o_proj = nn.Linear(K, H, bias=False)
        self.norm = norm_cls(H, eps=eps)
        self.op = op
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x, residual):
        residual = residual + all_reduce(self.o_proj(x), self.op)
        return self.norm(residual), residual


class ReshapedReduce(RowParallelResidualNorm):
    """The reduce runs on the 2-D GEMM output and is reshaped after the wait."""

    def forward(self, x, residual):
        y = all_reduce(torch.mm(x.reshape(-1, K), self.o_proj.weight.t()))
        residual = residual + y.reshape(residual.shape)
        return self.norm(residual), residual


class NormOnFlattenedSum(RowParallelResidualNorm):
    """The norm reads the sum reshaped to 2-D; the residual stream stays 3-D."""

    def forward(self, x, residual):
        residual = residual + all_reduce(self.o_proj(x))
        return self.norm(residual.reshape(-1, H)), residual


class ToyDecoder(nn.Module):
    """``layers`` HF-shaped layers (input norm -> row-parallel "attention" -> + residual -> post norm
    -> row-parallel "MLP" -> + residual) and a final norm: 2 matches per layer, the residual of each
    feeding the next, the last one into the final norm (whose residual has no other user)."""

    def __init__(self, layers=2, norm_cls=Qwen3RMSNorm):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.input_layernorm, layer.post_attention_layernorm = norm_cls(H), norm_cls(H)
            layer.o_proj, layer.down_proj = nn.Linear(H, H, bias=False), nn.Linear(H, H, bias=False)
            self.layers.append(layer)
        self.norm = norm_cls(H)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, norm_cls):
                    m.weight.uniform_(0.5, 1.5)

    def forward(self, h):
        for layer in self.layers:
            h = h + all_reduce(layer.o_proj(layer.input_layernorm(h)))
            h = h + all_reduce(layer.down_proj(torch.relu(layer.post_attention_layernorm(h))))
        return self.norm(h)


def rms_parts(h, weight, eps=1e-6):
    """HF's RMSNorm written out, returning the variance as well (a user outside the pattern)."""
    dt = h.dtype
    h32 = h.to(torch.float32)
    var = h32.pow(2).mean(-1, keepdim=True)
    return weight * (h32 * torch.rsqrt(var + eps)).to(dt), var


class NormWithOtherUser(RowParallelResidualNorm):
    def forward(self, x, residual):
        residual = residual + all_reduce(self.o_proj(x))
        normed, var = rms_parts(residual, self.norm.weight)
        return normed, residual, var


class NormWithoutWeight(RowParallelResidualNorm):
    def forward(self, x, residual):
        residual = residual + all_reduce(self.o_proj(x))
        h = residual.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(residual.dtype), residual


class EpsOutsideSqrt(RowParallelResidualNorm):
    def forward(self, x, residual):
        residual = residual + all_reduce(self.o_proj(x))
        h = residual.to(torch.float32)
        return self.norm.weight * (h / (h.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)).to(residual.dtype), residual


class BiasAfterReduce(RowParallelResidualNorm):
    """HF's row-parallel linear with bias adds the bias after the reduce: not a residual add."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(H))

    def forward(self, x, residual):
        y = all_reduce(self.o_proj(x)) + self.bias
        residual = residual + y
        return self.norm(residual), residual


class Fp32ResidualBf16Reduce(RowParallelResidualNorm):
    def forward(self, x, residual):   # residual fp32, reduce bf16: the add promotes
        residual = residual + all_reduce(nn.functional.linear(x.bfloat16(), self.o_proj.weight.bfloat16()))
        return self.norm(residual), residual


def toy_inputs(dtype=torch.float32, seed=0, rank=0):
    g = torch.Generator().manual_seed(seed + 1000 * (rank + 1))   # per-rank shard of the activation
    gr = torch.Generator().manual_seed(seed)                      # replicated residual
    return torch.randn(B, S, K, generator=g).to(dtype), torch.randn(B, S, H, generator=gr).to(dtype)


def toy_model(cls=RowParallelResidualNorm, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**kw).to(dtype).eval()


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
    cap = _make_pass(True, "fused")
    torch._dynamo.reset()
    fn = torch.compile(model, backend=functools.partial(_post_grad_backend, cap=cap), fullgraph=True)
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
    cap = _make_pass(True, "fused")
    torch._dynamo.reset()
    fn = torch.compile(model, backend=functools.partial(_post_grad_backend, cap=cap), fullgraph=True, dynamic=True)
    with torch.no_grad():
        fn(*toy_inputs())
    torch._dynamo.reset()
    assert [g["matches"] for g in cap.graphs] == [[]]
    assert "is not a constant number" in pass_log.text


def test_reference_op_is_hf_rmsnorm_after_the_residual_add(fake_pg):
    """On the fake group the reduce is the identity: the op must be bit-for-bit HF's
    ``residual + x`` followed by HF's RMSNorm, for either operand order."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype, norm_cls in ((torch.float32, Qwen3RMSNorm), (torch.bfloat16, Qwen3RMSNorm),
                            (torch.float16, LlamaRMSNorm)):
        torch.manual_seed(1)
        x, res = torch.randn(3, 5, 64).to(dtype), (10 * torch.randn(3, 5, 64)).to(dtype)
        norm = norm_cls(64, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            want_res = res + x
            want = norm(want_res)
        normed, new_res = torch.ops.tdist.all_reduce_rmsnorm(x, res, norm.weight, 1e-5, fake_pg, "fused")
        assert torch.equal(new_res, want_res) and torch.equal(new_res, x + res)
        assert torch.equal(normed, want) and normed.dtype == dtype


def test_toy_norm_is_a_verbatim_copy_of_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm as HFQwen3RMSNorm

    src = lambda f: inspect.getsource(f).strip()  # noqa: E731
    assert src(Qwen3RMSNorm.forward) == src(HFQwen3RMSNorm.forward) == src(LlamaRMSNorm.forward)


def test_op_rejects_an_unknown_impl(fake_pg):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="impl"):
        torch.ops.tdist.all_reduce_rmsnorm(x, x, torch.ones(8), 1e-6, fake_pg, "bogus")


# ============================================================================ numerics on 2 gloo ranks
def _hf_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tdcompile.tp import apply_hf_plan, build_model, default_mesh

    def qwen3(dtype):
        return build_model(dtype=dtype), apply_hf_plan(build_model(dtype=dtype), default_mesh())

    def llama(dtype):
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=32, vocab_size=1000, max_position_embeddings=512,
                          tie_word_embeddings=False, rms_norm_eps=1e-5)

        def make():
            torch.manual_seed(0)
            return LlamaForCausalLM(cfg).to(dtype).eval()
        return make(), apply_hf_plan(make(), default_mesh())
    return {"qwen3": qwen3, "llama": llama}


def _toy_case(rank, cls, dtype, **kw):
    model = toy_model(cls, dtype=dtype, **kw)
    if cls is ToyDecoder:
        inputs = (torch.randn(B, S, H, generator=torch.Generator().manual_seed(5 + rank)).to(dtype),)
    else:
        inputs = toy_inputs(dtype, rank=rank)
    with torch.no_grad():
        want = model(*inputs)
    graphs, got = compile_post_grad(model, *inputs)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    return {"max_abs_diff": max(float((w.float() - g.float()).abs().max()) for w, g in zip(want, got)),
            "bitwise": all(torch.equal(w, g) for w, g in zip(want, got)),
            "matches": [m["module"] for g in graphs for m in g["matches"]],
            "tdist_ops": sum(g["after"]["tdist.all_reduce_rmsnorm"] for g in graphs),
            "all_reduce_left": sum(g["after"]["c10d.all_reduce"] for g in graphs)}


def _hf_case(name, dtype):
    single, model = _hf_models()[name](dtype)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = single(ids, use_cache=False).logits.float()
        eager_tp = model(ids, use_cache=False).logits.float()
    graphs, out = compile_post_grad(model, ids, use_cache=False)
    out = out.logits.float()
    return {"max_diff_eager_tp": float((out - eager_tp).abs().max()), "max_diff_single": float((out - ref).abs().max()),
            "ref_scale": float(ref.abs().max()), "graphs": len(graphs),
            "matches": [(m["module"], m["source"], list(m["shape"])) for g in graphs for m in g["matches"]],
            "tdist_ops": sum(g["after"]["tdist.all_reduce_rmsnorm"] for g in graphs),
            "all_reduce_left": sum(g["after"]["c10d.all_reduce"] for g in graphs)}


def _hf_backend_case(name, dtype=torch.float32):
    """The whole tdist backend (Inductor code generation included), strategy 'fused'."""
    single, model = _hf_models()[name](dtype)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = single(ids, use_cache=False).logits.float()
        eager_tp = model(ids, use_cache=False).logits.float()
    report = tdcompile.explain(model, ids, use_cache=False, options={"strategy": "fused"}, fullgraph=True)
    torch._dynamo.reset()
    out = report.output.logits.float()
    after = "\n".join(a for _, a in report.graphs)
    return {"max_diff_eager_tp": float((out - eager_tp).abs().max()), "max_diff_single": float((out - ref).abs().max()),
            "graphs": len(report.graphs), "errors": list(getattr(report, "errors", [])),
            "matches": [(d.pattern, d.module, d.choice, d.rewritten) for d in report.matches],
            "tdist_ops": after.count("torch.ops.tdist.all_reduce_rmsnorm.default("),
            "all_reduce_left": after.count("_c10d_functional.all_reduce.default(")}


NUMERICS = {
    "toy_fp32": lambda rk: _toy_case(rk, RowParallelResidualNorm, torch.float32),
    "toy_bf16": lambda rk: _toy_case(rk, RowParallelResidualNorm, torch.bfloat16),
    "toy_fp16": lambda rk: _toy_case(rk, RowParallelResidualNorm, torch.float16),
    "toy_reshaped_reduce": lambda rk: _toy_case(rk, ReshapedReduce, torch.float32),
    "toy_norm_on_reshaped_sum_bf16": lambda rk: _toy_case(rk, NormOnFlattenedSum, torch.bfloat16),
    "toy_decoder_fp32": lambda rk: _toy_case(rk, ToyDecoder, torch.float32),
    "toy_decoder_bf16": lambda rk: _toy_case(rk, ToyDecoder, torch.bfloat16),
    "qwen3_fp32": lambda rk: _hf_case("qwen3", torch.float32),
    "qwen3_bf16": lambda rk: _hf_case("qwen3", torch.bfloat16),
    "llama_fp32": lambda rk: _hf_case("llama", torch.float32),
    "backend_qwen3": lambda rk: _hf_backend_case("qwen3"),
    "backend_llama": lambda rk: _hf_backend_case("llama"),
}


TOY_CASES = [n for n in NUMERICS if n.startswith("toy_")]
HF_CASES = [n for n in NUMERICS if n.startswith(("qwen3", "llama"))]
BACKEND_CASES = [n for n in NUMERICS if n.startswith("backend_")]


def _numerics_worker(rank: int, port: int, names: list) -> dict:
    torch.set_num_threads(1)   # two ranks share the cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    out = {}
    try:
        for name in names:
            try:
                out[name] = NUMERICS[name](rank)
            except Exception as e:  # report per case; keep the ranks in step
                import traceback
                out[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(names: list) -> list:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(rk), str(port), *names], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rk in range(W)]


def _collect(procs: list) -> list[dict]:
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("gloo workers timed out")
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"worker failed (rc={p.returncode}):\n{stderr[-4000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def _run_ranks(names: list) -> list[dict]:
    return _collect(_start_ranks(names))


_BACKGROUND: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _toy_ranks_in_background(request):
    """Start the toy gloo ranks when this module starts (if a selected test needs them): they
    run while the in-process tests above them do."""
    if any("gloo_toys" in item.fixturenames for item in request.session.items
           if getattr(item, "module", None) is request.module):
        _BACKGROUND["toys"] = _start_ranks(TOY_CASES)
    yield
    for p in _BACKGROUND.pop("toys", []):
        if p.poll() is None:
            p.kill()


@pytest.fixture(scope="module")
def gloo_toys():
    return _collect(_BACKGROUND.pop("toys", None) or _start_ranks(TOY_CASES))


@pytest.fixture(scope="module")
def gloo_hf():
    return _run_ranks(HF_CASES)


def _case(results, name):
    for rank, res in enumerate(results):
        assert "error" not in res[name], f"rank {rank}: {res[name]['error']}"
    return [res[name] for res in results]


@pytest.mark.parametrize("name", TOY_CASES)
def test_toy_rewrite_is_bitwise_equal_to_eager_on_two_gloo_ranks(gloo_toys, name):
    for rank, r in enumerate(_case(gloo_toys, name)):
        want = 4 if name.startswith("toy_decoder") else 1
        assert r["tdist_ops"] == want and len(r["matches"]) == want and r["all_reduce_left"] == 0, r
        assert r["bitwise"], f"rank {rank}: max abs diff {r['max_abs_diff']}"


def _expected_hf_matches(layers=2):
    """2 per layer: o_proj -> post_attention_layernorm, down_proj -> next input_layernorm / model.norm."""
    out = []
    for i in range(layers):
        out.append((f"model.layers.{i}.post_attention_layernorm", f"model.layers.{i}.self_attn.o_proj"))
        nxt = f"model.layers.{i + 1}.input_layernorm" if i + 1 < layers else "model.norm"
        out.append((nxt, f"model.layers.{i}.mlp.down_proj"))
    return out


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_unmodified_hf_model_under_tp_has_two_matches_per_layer(fake_pg, name):
    """Structure on the fake group (numerics: the slow gloo test below)."""
    _, model = _hf_models()[name](torch.float32)
    graphs, _ = compile_post_grad(model, torch.randint(0, 1000, (2, 16)), use_cache=False)
    (g,) = graphs
    assert [(m["module"], m["source"]) for m in g["matches"]] == _expected_hf_matches()
    assert all(m["shape"] == (32, 256, 0) for m in g["matches"])       # rows = 2 x 16 tokens, hidden 256
    assert g["before"]["c10d.all_reduce"] == 4 and g["after"]["tdist.all_reduce_rmsnorm"] == 4
    assert "c10d.all_reduce" not in g["after"]
    assert g["after"]["aten.rsqrt"] == g["before"]["aten.rsqrt"] - 4   # q/k norms and layer 0's input norm stay
    assert g["after"]["aten.mm"] == g["before"]["aten.mm"]             # the GEMMs are left alone


@pytest.mark.slow
@pytest.mark.parametrize("name", HF_CASES)
def test_unmodified_hf_model_under_tp_equals_eager_on_two_gloo_ranks(gloo_hf, name):
    for rank, r in enumerate(_case(gloo_hf, name)):
        assert r["graphs"] == 1
        assert [(m, s) for m, s, _ in r["matches"]] == _expected_hf_matches(), r["matches"]
        assert all(shape == [32, 256, 0] for _, _, shape in r["matches"])
        assert r["tdist_ops"] == 4 and r["all_reduce_left"] == 0
        if name.endswith("fp32"):
            assert r["max_diff_eager_tp"] <= 1e-5 and r["max_diff_single"] <= 1e-4, r
        else:   # bf16: the rewritten graph equals eager TP; both are bf16-far from the fp32 single process
            assert r["max_diff_eager_tp"] <= 1e-2 * r["ref_scale"], r
            assert r["max_diff_single"] <= 3e-2 * r["ref_scale"], r


# ============================================================================ through the tdist backend
def _wired() -> bool:
    return "find_all_reduce_rmsnorm_matches" in inspect.getsource(tdist_backend)


wired = pytest.mark.skipif(not _wired(), reason="backend.py does not call find_all_reduce_rmsnorm_matches yet")


@wired
def test_backend_rewrites_the_fusion_and_reports_it_as_its_own_pattern(fake_pg):
    model, x = toy_model(ToyDecoder), torch.randn(B, S, H)
    with torch.no_grad():
        eager = model(x)
    report = tdcompile.explain(model, x, options={"strategy": "fused"}, fullgraph=True)
    torch._dynamo.reset()
    fused = report.by_pattern("all_reduce_rmsnorm")
    assert sorted(d.module for d in fused) == sorted(["layers.0.post_attention_layernorm", "layers.1.input_layernorm",
                                                      "layers.1.post_attention_layernorm", "norm"])
    assert all(d.rewritten and d.shape == (B * S, H, 0) for d in fused)
    # the all-reduces went into all_reduce_rmsnorm: the competing GEMM matches stay unfused, saying why
    rivals = report.by_pattern("gemm_all_reduce") + report.by_pattern("all_reduce")
    assert rivals and all(not d.rewritten and d.choice == "unfused" and "goes to all_reduce_rmsnorm" in d.reason
                          for d in rivals)
    (_, after), = report.graphs
    assert after.count("torch.ops.tdist.all_reduce_rmsnorm.default(") == 4 and "_c10d_functional.all_reduce" not in after
    torch.testing.assert_close(report.output, eager, rtol=1e-5, atol=1e-5)   # fake group: the reduce is the identity


@pytest.mark.slow
@wired
def test_backend_unfused_strategy_keeps_the_collectives(fake_pg):
    model, x = toy_model(ToyDecoder), torch.randn(B, S, H)
    report = tdcompile.explain(model, x, options={"strategy": "unfused"}, fullgraph=True)
    torch._dynamo.reset()
    assert report.by_pattern("all_reduce_rmsnorm") and not any(d.rewritten for d in report.matches)
    (_, after), = report.graphs
    assert "tdist." not in after


@pytest.fixture(scope="module")
def gloo_backend():
    return _run_ranks(BACKEND_CASES)


@pytest.mark.slow
@wired
@pytest.mark.parametrize("name", BACKEND_CASES)
def test_backend_fuses_every_residual_norm_of_unmodified_hf_models_and_equals_eager(gloo_backend, name):
    for rank, r in enumerate(_case(gloo_backend, name)):
        assert r["graphs"] == 1 and not r["errors"], r
        arn = sorted(mod for pat, mod, choice, rewritten in r["matches"]
                     if pat == "all_reduce_rmsnorm" and choice == "fused" and rewritten)
        assert arn == sorted(m for m, _ in _expected_hf_matches()), r["matches"]
        # the GEMM matches of the same all_reduces stay unfused (ties go to the RMSNorm fusion)
        assert all(not rewritten and choice == "unfused" for pat, _, choice, rewritten in r["matches"]
                   if pat in ("gemm_all_reduce", "all_reduce")), r["matches"]
        assert r["tdist_ops"] == 4 and r["all_reduce_left"] == 0
        assert r["max_diff_eager_tp"] <= 1e-4 and r["max_diff_single"] <= 1e-4, r


if __name__ == "__main__":   # numerics worker: python tests/test_all_reduce_rmsnorm.py RANK PORT
    logging.basicConfig(level=logging.WARNING)
    print("RESULT " + json.dumps(_numerics_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] or list(NUMERICS))),
          flush=True)
