"""The 2-rank gloo job behind tests/test_e2e_tiny_qwen3.py.

Every scenario compiles the tiny Qwen3 once (~20 s on 2 cores), so one spawned job runs
them all and rank 0 writes the measurements to a JSON file that the tests assert on.
Run alone: ``python tests/e2e_worker.py out.json``.
"""
from __future__ import annotations

import json
import sys
import time
import traceback

import torch
import torch.distributed as dist

import tdcompile
from tdcompile import backend, launch
from tdcompile.report import Report
from tdcompile.tp import build_model, build_tp_model

COLLECTIVES = ("_c10d_functional.all_reduce", "_c10d_functional.all_gather_into_tensor",
               "_c10d_functional.reduce_scatter_tensor")


def _ids(b, s, seed=1):
    return torch.randint(0, 1000, (b, s), generator=torch.Generator().manual_seed(seed))


def _summary(report: Report) -> dict:
    after = "\n".join(a for _, a in report.graphs)
    return {
        "graphs": len(report.graphs),
        "matches": [{"pattern": d.pattern, "module": d.module, "shape": list(d.shape), "choice": d.choice,
                     "rewritten": d.rewritten, "reason": d.reason, "predicted_us": d.predicted_us,
                     "detail": d.match.describe()} for d in report.matches],
        "ops_after": {op: after.count(op + ".default(") for op in COLLECTIVES},
        "tdist_ops_after": after.count("torch.ops.tdist."),
    }


def forward_case(plan, strategy, b=2, s=16, dtype=torch.float32, options=None):
    ref = build_model(dtype=dtype)
    model = build_tp_model(plan=plan, dtype=dtype)
    ids = _ids(b, s)
    with torch.no_grad():
        single = ref(ids, use_cache=False).logits.float()
        eager_tp = model(ids, use_cache=False).logits.float()
    rep = tdcompile.explain(model, ids, use_cache=False, options={"strategy": strategy, **(options or {})},
                            fullgraph=True)
    out = rep.output.logits.float()
    return {**_summary(rep), "max_diff_single": (out - single).abs().max().item(),
            "max_diff_eager_tp": (out - eager_tp).abs().max().item(),
            "ref_scale": single.abs().max().item()}


def decode_case(plan, strategy, b=2, prefill=8, steps=3):
    """Eager prefill into a StaticCache, then compiled decode steps (fullgraph)."""
    from transformers import StaticCache

    ref = build_model()
    model = build_tp_model(plan=plan)
    ids = _ids(b, prefill + steps, seed=2)
    with torch.no_grad():
        full = ref(ids, use_cache=False).logits
        cache = StaticCache(config=model.config, max_cache_len=32)
        model(ids[:, :prefill], past_key_values=cache, use_cache=True)
        rep = Report()
        torch._dynamo.reset()
        backend._sinks.append(rep)
        try:
            step = torch.compile(model, backend="tdist", options={"strategy": strategy}, fullgraph=True)
            diffs = []
            for i in range(steps):
                pos = prefill + i
                logits = step(ids[:, pos:pos + 1], past_key_values=cache, use_cache=True).logits
                diffs.append((logits[:, -1] - full[:, pos]).abs().max().item())
        finally:
            backend._sinks.remove(rep)
    return {**_summary(rep), "step_diffs": diffs}


def dynamic_m_case():
    """One graph for several token counts (dynamic=True): with a GPU profile the ops get
    impl="auto" and decide from the actual M at run time."""
    ref = build_model()
    model = build_tp_model(plan="hf")
    rep = Report()
    torch._dynamo.reset()
    backend._sinks.append(rep)
    diffs = []
    try:
        fn = torch.compile(model, backend="tdist", options={"strategy": "auto", "profile": "h200"}, dynamic=True)
        with torch.no_grad():
            for b, s in ((2, 16), (2, 9), (3, 5)):  # size 1 would specialize
                ids = _ids(b, s, seed=b * s)
                diffs.append((fn(ids, use_cache=False).logits - ref(ids, use_cache=False).logits).abs().max().item())
    finally:
        backend._sinks.remove(rep)
    return {**_summary(rep), "diffs": diffs}


def no_collective_case():
    """A model without collectives: tdist must equal plain Inductor."""
    model = build_model()
    ids = _ids(2, 8)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        torch._dynamo.reset()
        ind = torch.compile(model, backend="inductor")(ids, use_cache=False).logits
    rep = tdcompile.explain(model, ids, use_cache=False, options={"strategy": "fused"})
    return {**_summary(rep), "max_diff_eager": (rep.output.logits - eager).abs().max().item(),
            "max_diff_inductor": (rep.output.logits - ind).abs().max().item()}


CASES = {
    "hf_fused": lambda: forward_case("hf", "fused"),
    "hf_auto": lambda: forward_case("hf", "auto"),
    "hf_auto_h200_profile": lambda: forward_case("hf", "auto", options={"profile": "h200"}),
    "torch_fused": lambda: forward_case("torch", "fused"),
    "torch_sp_fused": lambda: forward_case("torch_sp", "fused"),
    "torch_sp_auto": lambda: forward_case("torch_sp", "auto"),
    "hf_sp_3x7": lambda: forward_case("hf", "sequence_parallel", b=3, s=7),
    "torch_sp_rewrite": lambda: forward_case("torch", "sequence_parallel"),
    "hf_fused_bf16": lambda: forward_case("hf", "fused", dtype=torch.bfloat16),
    "hf_fused_m_odd": lambda: forward_case("hf", "fused", b=1, s=7),
    "decode_hf_fused": lambda: decode_case("hf", "fused"),
    "decode_hf_sp": lambda: decode_case("hf", "sequence_parallel", b=3),
    "no_collectives": no_collective_case,
    "dynamic_m": dynamic_m_case,
}


def run_all(device, out_path, names):
    results = {}
    for name in names:
        t0 = time.monotonic()
        try:
            results[name] = CASES[name]()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.monotonic() - t0, 1)
        if dist.get_rank() == 0:
            print(f"[e2e] {name}: {results[name]['seconds']} s", flush=True)
        dist.barrier()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


def main(out_path, names=None):
    launch.run(run_all, 2, out_path, list(names or CASES))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or None)
