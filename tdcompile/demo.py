"""``tdcompile demo`` / ``tdcompile inspect``: compile a TP Qwen3 with tdist and show what
the compiler did (rewrite report) and how the compiled output compares with eager."""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import tdcompile
from tdcompile.tp import PLANS, build_model, build_tp_model, tiny_qwen3_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn (ignored under torchrun)")
    p.add_argument("--plan", choices=PLANS, default="hf", help="TP plan applied to the unmodified HF model")
    p.add_argument("--strategy", default=None,
                   help="tdist strategy (default: 'fused' on CPU so the rewrite is visible, 'auto' on GPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--checkpoint", default=None, help="local HF checkpoint dir (default: tiny random Qwen3)")
    p.add_argument("--profile", default=None,
                   help="cost-model device profile (h100, h200 or a calibrate JSON); lets 'auto' show its choice on CPU")
    p.add_argument("--dump-dir", default=None, help="write the graphs of each pipeline stage here")
    p.add_argument("--show-graph", action="store_true", help="print the rewritten graph(s)")


def _print0(*a) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def demo(device: torch.device, args: argparse.Namespace) -> None:
    strategy = args.strategy or ("auto" if device.type == "cuda" else "fused")
    dtype = DTYPES[args.dtype]
    cfg = None if args.checkpoint else tiny_qwen3_config()
    model = build_tp_model(cfg, plan=args.plan, dtype=dtype, device=device, checkpoint=args.checkpoint)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    options = {"strategy": strategy, "dump_dir": args.dump_dir, "profile": args.profile}
    world = dist.get_world_size() if dist.is_initialized() else 1
    _print0(f"tdist demo: Qwen3 {model.config.num_hidden_layers} layers hidden {model.config.hidden_size}, "
            f"plan={args.plan}, world={world}, device={device.type}, strategy={strategy}, input {tuple(ids.shape)}")

    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
    report = tdcompile.explain(model, ids, use_cache=False, options=options, fullgraph=True)
    compiled = report.output.logits
    _print0("\n== rewrite report ==\n" + str(report))
    if args.show_graph:
        for i, (_, after) in enumerate(report.graphs):
            _print0(f"\n== graph {i} after rewrite ==\n{after}")

    diff = (compiled.float() - eager.float()).abs().max().item()
    ref_model = build_model(cfg, dtype=dtype, device=device, checkpoint=args.checkpoint)
    with torch.no_grad():
        single = ref_model(ids, use_cache=False).logits
    diff_single = (compiled.float() - single.float()).abs().max().item()
    _print0("\n== compiled vs eager ==")
    _print0(f"max |tdist - eager TP|        = {diff:.3e}")
    _print0(f"max |tdist - single process|  = {diff_single:.3e}")
    if device.type == "cuda":
        _time_vs_eager(model, ids, options)
    else:
        _print0("(timings are shown on GPUs only: CPU timings say nothing about the fused kernels)")


def _time_vs_eager(model, ids, options) -> None:
    compiled = torch.compile(model, backend="tdist", options=options, fullgraph=True)

    def med(fn, n=20):
        ts = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[n // 2] * 1e3

    with torch.no_grad():
        compiled(ids, use_cache=False)
        te = med(lambda: model(ids, use_cache=False))
        tc = med(lambda: compiled(ids, use_cache=False))
    _print0(f"eager {te:.3f} ms, tdist {tc:.3f} ms, speedup {te / tc:.2f}x (median of 20)")
