"""2 gloo ranks for the ``all_reduce_rmsnorm`` numerics: the cases, the worker and its runner.

``python tests/rmsnorm_gloo.py RANK RDZV [CASE ...]`` runs the named cases of ``NUMERICS`` on one
rank: the toys of ``rmsnorm_toys`` (bitwise equal to eager, the op is HF's arithmetic), the
unmodified tiny HF Qwen3 and Llama under HF's ``tp_plan`` through ``compile_post_grad``, and the
same HF models through the whole tdist backend. ``start_ranks`` / ``collect`` / ``run_ranks`` run
the 2 ranks from a test.
"""
from __future__ import annotations

import json
import logging
import sys

import torch
import torch.distributed as dist

import tdcompile

import gloo_ranks

from rmsnorm_toys import (B, H, S, W, NormOnFlattenedSum, ReshapedReduce, RowParallelResidualNorm, ToyDecoder,
                          compile_post_grad, toy_inputs, toy_model)




def hf_models():
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


def _toy_case(rank, cls, dtype, gemm=False, **kw):
    model = toy_model(cls, dtype=dtype, **kw)
    if cls is ToyDecoder:
        inputs = (torch.randn(B, S, H, generator=torch.Generator().manual_seed(5 + rank)).to(dtype),)
    else:
        inputs = toy_inputs(dtype, rank=rank)
    with torch.no_grad():
        want = model(*inputs)
    graphs, got = compile_post_grad(model, *inputs, gemm=gemm)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    return {"max_abs_diff": max(float((w.float() - g.float()).abs().max()) for w, g in zip(want, got)),
            "bitwise": all(torch.equal(w, g) for w, g in zip(want, got)),
            "matches": [m["module"] for g in graphs for m in g["matches"]],
            "tdist_ops": sum(g["after"]["tdist.all_reduce_rmsnorm"] + g["after"]["tdist.gemm_all_reduce_rmsnorm"]
                             for g in graphs),
            "all_reduce_left": sum(g["after"]["c10d.all_reduce"] for g in graphs)}


def _hf_case(name, dtype):
    single, model = hf_models()[name](dtype)
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
    single, model = hf_models()[name](dtype)
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
            "tdist_ops": after.count("torch.ops.tdist.gemm_all_reduce_rmsnorm.default("),
            "all_reduce_left": after.count("_c10d_functional.all_reduce.default(")}


NUMERICS = {
    "toy_fp32": lambda rk: _toy_case(rk, RowParallelResidualNorm, torch.float32),
    "toy_bf16": lambda rk: _toy_case(rk, RowParallelResidualNorm, torch.bfloat16),
    "toy_fp16": lambda rk: _toy_case(rk, RowParallelResidualNorm, torch.float16),
    "toy_reshaped_reduce": lambda rk: _toy_case(rk, ReshapedReduce, torch.float32),
    "toy_norm_on_reshaped_sum_bf16": lambda rk: _toy_case(rk, NormOnFlattenedSum, torch.bfloat16),
    "toy_decoder_fp32": lambda rk: _toy_case(rk, ToyDecoder, torch.float32),
    "toy_decoder_bf16": lambda rk: _toy_case(rk, ToyDecoder, torch.bfloat16),
    "toy_gemm_fp32": lambda rk: _toy_case(rk, RowParallelResidualNorm, torch.float32, gemm=True),
    "toy_gemm_bf16": lambda rk: _toy_case(rk, RowParallelResidualNorm, torch.bfloat16, gemm=True),
    "toy_gemm_decoder_bf16": lambda rk: _toy_case(rk, ToyDecoder, torch.bfloat16, gemm=True),
    "qwen3_fp32": lambda rk: _hf_case("qwen3", torch.float32),
    "qwen3_bf16": lambda rk: _hf_case("qwen3", torch.bfloat16),
    "llama_fp32": lambda rk: _hf_case("llama", torch.float32),
    "backend_qwen3": lambda rk: _hf_backend_case("qwen3"),
    "backend_llama": lambda rk: _hf_backend_case("llama"),
}


TOY_CASES = [n for n in NUMERICS if n.startswith("toy_")]
HF_CASES = [n for n in NUMERICS if n.startswith(("qwen3", "llama"))]
BACKEND_CASES = [n for n in NUMERICS if n.startswith("backend_")]


def _numerics_worker(rank: int, rdzv: str, names: list) -> dict:
    gloo_ranks.init(rank, W, rdzv)
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
        gloo_ranks.finish()
    return out


def start_ranks(names: list) -> list:
    return gloo_ranks.start(__file__, W, *names)


def collect(procs: list) -> list[dict]:
    return gloo_ranks.collect(procs)


def run_ranks(names: list) -> list[dict]:
    return collect(start_ranks(names))


if __name__ == "__main__":   # numerics worker: python tests/rmsnorm_gloo.py RANK RDZV
    logging.basicConfig(level=logging.WARNING)
    print("RESULT " + json.dumps(_numerics_worker(int(sys.argv[1]), sys.argv[2], sys.argv[3:] or list(NUMERICS))),
          flush=True)
