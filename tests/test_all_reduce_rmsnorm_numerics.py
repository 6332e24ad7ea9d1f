"""``tdist.all_reduce_rmsnorm`` (and ``gemm_all_reduce_rmsnorm``, the same with its GEMM): the op's arithmetic, unmodified HF models, the tdist backend, and
the numerics on 2 gloo ranks (issue 10, item 3; harness: ``rmsnorm_toys``, ranks: ``rmsnorm_gloo``).

* the reference op is bit-for-bit HF's ``residual + x`` followed by HF's RMSNorm (the toy norm is
  a verbatim copy of HF's);
* the unmodified tiny HF Qwen3 and Llama under HF's ``tp_plan`` have 2 matches per layer (the last
  one feeds ``model.norm``);
* through the tdist backend the fusion is rewritten and reported as its own pattern, its rival
  GEMM matches stay unfused saying why;
* on 2 gloo ranks the rewritten toys are bitwise equal to eager, the HF models equal eager TP
  (slow), and so does the whole backend on them (slow).

The toy ranks start in the background when this module starts: they run while the in-process
tests above them do.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import tdcompile
from tdcompile import backend as tdist_backend

from rmsnorm_gloo import BACKEND_CASES, HF_CASES, TOY_CASES, collect, hf_models, run_ranks, start_ranks
from rmsnorm_toys import B, H, S, Qwen3RMSNorm, ToyDecoder, compile_post_grad, toy_model


# ============================================================================ the op (fake group)
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


# ============================================================================ unmodified HF models (fake group)
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
    _, model = hf_models()[name](torch.float32)
    graphs, _ = compile_post_grad(model, torch.randint(0, 1000, (2, 16)), use_cache=False)
    (g,) = graphs
    assert [(m["module"], m["source"]) for m in g["matches"]] == _expected_hf_matches()
    assert all(m["shape"] == (32, 256, 0) for m in g["matches"])       # rows = 2 x 16 tokens, hidden 256
    assert g["before"]["c10d.all_reduce"] == 4 and g["after"]["tdist.all_reduce_rmsnorm"] == 4
    assert "c10d.all_reduce" not in g["after"]
    assert g["after"]["aten.rsqrt"] == g["before"]["aten.rsqrt"] - 4   # q/k norms and layer 0's input norm stay
    assert g["after"]["aten.mm"] == g["before"]["aten.mm"]             # the GEMMs are left alone


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
    norms = ["layers.0.post_attention_layernorm", "layers.1.input_layernorm", "layers.1.post_attention_layernorm",
             "norm"]
    for pattern, k in (("gemm_all_reduce_rmsnorm", H), ("all_reduce_rmsnorm", 0)):   # both forms are reported
        assert sorted(d.module for d in report.by_pattern(pattern)) == sorted(norms)
        assert all(d.shape == (B * S, H, k) for d in report.by_pattern(pattern))
    # a forced strategy saves nothing known: every all-reduce goes to the largest fusion, GEMM included
    assert all(d.rewritten for d in report.by_pattern("gemm_all_reduce_rmsnorm"))
    rivals = report.by_pattern("all_reduce_rmsnorm") + report.by_pattern("gemm_all_reduce") + \
        report.by_pattern("all_reduce")
    assert rivals and all(not d.rewritten and d.choice == "unfused" and "goes to gemm_all_reduce_rmsnorm" in d.reason
                          for d in rivals)
    (_, after), = report.graphs
    assert after.count("torch.ops.tdist.gemm_all_reduce_rmsnorm.default(") == 4
    assert "_c10d_functional.all_reduce" not in after and "tdist.all_reduce_rmsnorm" not in after
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


# ============================================================================ numerics on 2 gloo ranks
_BACKGROUND: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _toy_ranks_in_background(request):
    """Start the toy gloo ranks when this module starts (if a selected test needs them): they
    run while the in-process tests above them do."""
    if any("gloo_toys" in item.fixturenames for item in request.session.items
           if getattr(item, "module", None) is request.module):
        _BACKGROUND["toys"] = start_ranks(TOY_CASES)
    yield
    for p in _BACKGROUND.pop("toys", []):
        if p.poll() is None:
            p.kill()


@pytest.fixture(scope="module")
def gloo_toys():
    return collect(_BACKGROUND.pop("toys", None) or start_ranks(TOY_CASES))


@pytest.fixture(scope="module")
def gloo_hf():
    return run_ranks(HF_CASES)


def _case(results, name):
    for rank, res in enumerate(results):
        assert "error" not in res[name], f"rank {rank}: {res[name]['error']}"
    return [res[name] for res in results]


@pytest.mark.parametrize("name", TOY_CASES)
def test_toy_rewrite_is_bitwise_equal_to_eager_on_two_gloo_ranks(gloo_toys, name):
    for rank, r in enumerate(_case(gloo_toys, name)):
        want = 4 if "decoder" in name else 1
        assert r["tdist_ops"] == want and len(r["matches"]) == want and r["all_reduce_left"] == 0, r
        assert r["bitwise"], f"rank {rank}: max abs diff {r['max_abs_diff']}"


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


@pytest.fixture(scope="module")
def gloo_backend():
    return run_ranks(BACKEND_CASES)


@pytest.mark.slow
@wired
@pytest.mark.parametrize("name", BACKEND_CASES)
def test_backend_fuses_every_residual_norm_of_unmodified_hf_models_and_equals_eager(gloo_backend, name):
    for rank, r in enumerate(_case(gloo_backend, name)):
        assert r["graphs"] == 1 and not r["errors"], r
        arn = sorted(mod for pat, mod, choice, rewritten in r["matches"]
                     if pat == "gemm_all_reduce_rmsnorm" and choice == "fused" and rewritten)
        assert arn == sorted(m for m, _ in _expected_hf_matches()), r["matches"]
        # the other matches of the same all_reduces stay unfused (ties go to the largest fusion)
        assert all(not rewritten and choice == "unfused" for pat, _, choice, rewritten in r["matches"]
                   if pat in ("all_reduce_rmsnorm", "gemm_all_reduce", "all_reduce")), r["matches"]
        assert r["tdist_ops"] == 4 and r["all_reduce_left"] == 0
        assert r["max_diff_eager_tp"] <= 1e-4 and r["max_diff_single"] <= 1e-4, r
