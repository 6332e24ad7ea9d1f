"""tdcompile demo and tdcompile inspect: compile a tensor-parallel Qwen3 with tdist.

* demo    -- the quick tour: the rewrite report, then compiled vs eager (max difference to the
             eager TP model and to a single-process model; timings on GPUs only).
* inspect -- the rewrite report only (matches, module paths, shapes, candidates with their
             microseconds and where those came from, the decision and why), with graph dumps
             on request; no timing, no comparison. On a GPU, matches whose shapes the measured
             table does not hold yet are measured while compiling (all ranks together); a
             dynamic-M match left to the op ("auto") is measured by the first call, and then
             the report is produced again so that it shows the measured times.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import tdcompile
from tdcompile.generate import add_model_args, model_setup, positive_int
from tdcompile.launch import say
from tdcompile.models import build_sharded
from tdcompile.tp import PLANS


def add_args(p: argparse.ArgumentParser, *, inspect: bool = False) -> None:
    add_model_args(p, strategy_default=None, cuda_graphs=False)
    p.add_argument("--plan", choices=PLANS, default="hf",
                   help="tensor-parallel plan applied to the unmodified HF model: hf (transformers' tp_plan), "
                        "torch (parallelize_module), torch_sp (with sequence parallel), none; default %(default)s")
    p.add_argument("--batch", type=positive_int, default=2, help="sequences in the example input (default 2)")
    p.add_argument("--seq", type=positive_int, default=16,
                   help="tokens per sequence (default 16; torch_sp needs a multiple of the rank count)")
    p.add_argument("--dump-dir", default=None, metavar="DIR",
                   help="write the graph of every pipeline stage and the report to "
                        "DIR/rank<r>/graph<g>/ (00.input.py ... 04.rewrite.after.py, 03.match.txt)")
    p.add_argument("--show-graph", action="store_true", help="print each graph's code after the rewrite")
    if inspect:
        p.add_argument("--json", default=None, metavar="FILE", help="also write the report's rows to FILE (JSON)")


def default_strategy(args, device: torch.device) -> str:
    return args.strategy or ("auto" if device.type == "cuda" else "fused")


def _options(args, device) -> dict:
    return {"strategy": default_strategy(args, device), "dump_dir": args.dump_dir, "profile": args.profile}


def _build(device, args, plan: str):
    config, dtype, _ = model_setup(args, device)
    t0 = time.perf_counter()
    name = str(dtype).removeprefix("torch.")
    what = f"plan={plan}" if plan != "none" else "unsharded, the single-process reference"
    say(f"building {config.num_hidden_layers}-layer Qwen3 (hidden {config.hidden_size}, {name}), {what} ...")
    model = build_sharded(config, plan, dtype=dtype, device=device, checkpoint=args.checkpoint, seed=args.seed,
                          progress=False)
    say(f"  built in {time.perf_counter() - t0:.1f} s")
    return model


def _input_ids(model, args, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)  # [B, S]


def _explain(model, ids, options):
    t0 = time.perf_counter()
    say(f"compiling with tdist (strategy={options['strategy']!r}): Dynamo -> AOT -> tdist pass -> Inductor ...")
    report = tdcompile.explain(model, ids, use_cache=False, options=options, fullgraph=True)
    say(f"  compiled and ran once in {time.perf_counter() - t0:.1f} s")
    return report


def _header(cmd: str, args, device, options) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    say(f"tdcompile {cmd}: plan={args.plan}, world={world}, device={device.type}, strategy={options['strategy']}, "
        f"profile={options['profile'] or 'default'}, input {args.batch}x{args.seq}")


def _print_report(report, args) -> None:
    say("\n== rewrite report ==\n" + str(report))
    if args.show_graph:
        for i, (_, after) in enumerate(report.graphs):
            say(f"\n== graph {i} after the rewrite ==\n{after}")
    if args.dump_dir:
        say(f"\ngraphs of every stage written under {args.dump_dir}/rank<r>/graph<g>/")


def _setup(command: str, device: torch.device, args: argparse.Namespace):
    """(tdist options, the sharded model, its input ids) for ``command``, with the header printed."""
    options = _options(args, device)
    _header(command, args, device, options)
    model = _build(device, args, args.plan)
    return options, model, _input_ids(model, args, device)


def inspect(device: torch.device, args: argparse.Namespace) -> None:
    """Print the rewrite report for the model/plan/strategy/profile of ``args``; no timing."""
    options, model, ids = _setup("inspect", device, args)
    report = _explain(model, ids, options)
    if device.type == "cuda" and _any_rank(any(d.choice == "auto" for d in report.matches)):
        pending = sum(d.choice == "auto" for d in report.matches)
        say(f"{pending} match(es) were not in the measured table: that first call measured them on all ranks; "
            "explaining again to show the measured times ...")
        report = _explain(model, ids, options)
    _print_report(report, args)
    if args.json and (not dist.is_initialized() or dist.get_rank() == 0):
        with open(args.json, "w") as f:
            f.write(report.to_json() + "\n")
        say(f"report rows written to {args.json}")


def demo(device: torch.device, args: argparse.Namespace) -> None:
    """The quick tour: rewrite report, then compiled vs eager (and timings on GPUs)."""
    options, model, ids = _setup("demo", device, args)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
    report = _explain(model, ids, options)
    _print_report(report, args)

    compiled = report.output.logits
    say("")
    ref_model = _build(device, args, "none")          # same seed -> the same weights, unsharded
    with torch.no_grad():
        single = ref_model(ids, use_cache=False).logits
    say("\n== compiled vs eager ==")
    if options["strategy"] == "bound":
        say("strategy='bound' replaced every collective with a no-op: the output is NOT valid")
    say(f"max |tdist - eager TP|        = {(compiled.float() - eager.float()).abs().max().item():.3e}")
    say(f"max |tdist - single process|  = {(compiled.float() - single.float()).abs().max().item():.3e}")
    if device.type == "cuda":
        _time_vs_eager(model, ids, options)
    else:
        say("(timings are shown on GPUs only: CPU timings say nothing about the fused kernels)")


def _any_rank(flag: bool) -> bool:
    """``flag`` of any rank (every rank gets the same answer, so they take the same branch)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


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
    say(f"eager {te:.3f} ms, tdist {tc:.3f} ms, speedup {te / tc:.2f}x (median of 20)")
