"""``tdcompile bench``: Qwen3 cases at TP = world, compiled vs eager, with the limit.

Columns, run in this order so a run cut short keeps the baselines: eager TP (HF plan,
NCCL/gloo), ``torch.compile`` inductor, inductor async TP (``_micro_pipeline_tp`` on the
sequence-parallel ``torch_sp`` plan; ``torch`` plan for S=1 decode, which SP cannot shard;
CUDA and world > 1 only), ``bound`` (tdist with every collective replaced by a no-op of the
same shape: the time with free communication, the best any comm hiding can reach -- timing
only, NOT a valid output) and tdist (``auto``). Derived: tdist vs each baseline, ``vs best
baseline`` (best of eager, inductor, async-TP) and ``gap closed`` = (inductor - tdist) /
(inductor - bound). Rows: layer level (MLP, attention prefill/decode), E2E forward (prefill,
decode; lm_head excluded and included) and full inference (prefill + N decode steps). Medians
of CUDA-event (GPU) or perf_counter (CPU) timings after a warm-up of at least ``--warmup-ms``,
the max over ranks; decode and layer rows replay CUDA graphs on GPU. ``--resume FILE``
continues a table (cells already measured are kept), so a long table can be assembled from
several runs. ``--check`` compares last-position softmax of tdist, eager TP and a
single-device reference.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import torch.distributed as dist

from tdcompile import timing
from tdcompile.bench_cases import (BASELINES, COLUMNS, HEADERS, NOISE, Row, free_model, large_batch,  # noqa: F401
                                   plan_for, prepare_row, rows_for, run_infer)
from tdcompile.check import check
from tdcompile.engine import Timer
from tdcompile.generate import add_model_args, model_setup, positive_int
from tdcompile.models import build_sharded
from tdcompile.timing import measure, measure_bursts, measure_interleaved

def versions() -> dict:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def machine(device) -> dict:
    m = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        m |= {"gpu": torch.cuda.get_device_name(device), "gpus": torch.cuda.device_count()}
    return m


# ------------------------------------------------------------------ traces
def trace_row(runs: dict, row: Row, columns: list, stem: str, rank: int, say) -> dict:
    """Three calls of each of ``columns`` (as timed: graphed where the row is) under torch.profiler,
    on every rank (the calls are collectives); a Chrome trace per rank and column next to the
    bench JSON, the top device kernels in the log (rank 0).  Returns ``{row / column: path}``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    out = {}
    for col in columns:
        if col not in runs:
            continue
        fn, rewind = runs[col]
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(3):
                rewind()
                fn()
            if cuda:
                torch.cuda.synchronize()
        slug = "".join(ch if ch.isalnum() else "_" for ch in row.name).strip("_")
        path = f"{stem}-trace-{slug}-{col.replace(':', '_')}-rank{rank}.json"   # "tdist:sp": no ':' in names
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)   # every rank writes (kineto fails silently)
        prof.export_chrome_trace(path)
        out[f"{row.name} / {col}"] = os.path.basename(path)
        say(f"[trace] {row.name} / {col}: {path}\n" + prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=12))
    return out


# ------------------------------------------------------------------ outputs
def table(results: dict, rows: list[Row], avail: list[str]) -> list[dict]:
    out = []
    for row in rows:
        r = results[row.name]
        d = {"case": row.name, "graph": r.get("graph", "")}
        for c in list(COLUMNS) + [c for c in avail if c not in COLUMNS]:   # + forced tdist strategies
            d[f"{HEADERS.get(c, c)} ms"] = (round(r[c], 3) if isinstance(r.get(c), float) else r.get(c)) \
                if c in avail else "n/a"
        num = lambda c: isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)  # noqa: E731
        for c in BASELINES:
            d[f"vs {HEADERS.get(c, c)}"] = round(r[c] / r["tdist"], 3) if num(c) and num("tdist") else "n/a"
        base = [r[c] for c in BASELINES if num(c)]
        d["vs best baseline"] = round(min(base) / r["tdist"], 3) if base and num("tdist") else "n/a"
        gap = num("inductor") and num("bound") and num("tdist") and r["inductor"] - r["bound"] > 1e-6
        d["gap closed"] = round((r["inductor"] - r["tdist"]) / (r["inductor"] - r["bound"]), 3) if gap else "n/a"
        if NOISE in avail:      # same code twice: the spread to read "vs inductor" against
            d["inductor / again"] = round(r["inductor"] / r[NOISE], 3) if num("inductor") and num(NOISE) else "n/a"
        out.append(d)
    return out


def plot(rows: list[dict], columns: list, path: str, title: str) -> None:
    """Every measured column as speedup over inductor (bars), ``bound`` as the limit (markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ms(row, c):
        v = row.get(f"{HEADERS.get(c, c)} ms")
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None

    ref = "inductor" if "inductor" in columns else (columns[0] if columns else None)
    bars = [c for c in columns if c not in (ref, "bound")]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 5))
    w = 0.8 / max(1, len(bars))
    for i, c in enumerate(bars):
        ys = [(ms(r, ref) / ms(r, c)) if ms(r, ref) and ms(r, c) else 0 for r in rows]
        ax.bar([j + i * w for j in range(len(rows))], ys, w, label=HEADERS.get(c, c))
    centre = [j + w * (len(bars) - 1) / 2 for j in range(len(rows))]
    if "bound" in columns and ref:
        ys = [(ms(r, ref) / ms(r, "bound")) if ms(r, ref) and ms(r, "bound") else float("nan") for r in rows]
        ax.plot(centre, ys, "k_", markersize=18, mew=2, label="bound (free communication)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(centre)
    ax.set_xticklabels([r["case"] for r in rows], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(f"speedup over {HEADERS.get(ref, ref)} (x)")
    ax.set_title(title, fontsize=10)
    if bars or "bound" in columns:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ entry points
def add_bench_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--quick", action="store_true", help="tiny model, a few tiny cases (CPU tests)")
    p.add_argument("--check", action="store_true", help="run the correctness check instead of the benchmark")
    p.add_argument("--check-batch", type=int, default=2, help="sequences in the --check comparison (default 2)")
    p.add_argument("--ctx", type=int, default=None, help="context / prompt length (default 128; quick 16)")
    p.add_argument("--steps", type=int, default=None, help="decode steps of the inference row (128; quick 4)")
    p.add_argument("--large-batch", type=int, default=None, help="default: the largest <= 4096 that fits")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per case (20; quick 3)")
    p.add_argument("--infer-runs", type=int, default=3, help="timed generate() runs of the inference row (default 3)")
    p.add_argument("--columns", default=",".join(COLUMNS),
                   help="comma-separated columns: eager, inductor, async_tp, bound, tdist, inductor_again (Inductor "
                        "compiled twice: the noise of this run), tdist:sp (the sequence-parallel form forced, "
                        "each match decided as in tdist), tdist:margin<percent> (auto with that margin: "
                        "Options.margin), or tdist:<strategy> "
                        f"to force one (default {','.join(COLUMNS)})")
    p.add_argument("--cases", default=None, help="comma-separated substrings (or '=name' for an exact name); "
                                                 "keep only matching cases")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG (default benchmarks/results)")
    p.add_argument("--tag", default=None, help="file-name tag (default: device name)")
    p.add_argument("--resume", default=None, help="a bench JSON to continue: its measured cells are kept, "
                                                  "the rest measured, all saved to that file")
    p.add_argument("--warmup-ms", type=float, default=timing.WARMUP_MS, help="minimum warm-up per case (ms)")
    p.add_argument("--rounds", type=positive_int, default=timing.ROUNDS,
                   help="interleaved rounds per row: the columns take turns this many times (more = less drift)")
    p.add_argument("--trace", default=None,
                   help="comma-separated columns (e.g. tdist,bound) to trace after timing each row: 3 calls under "
                        "torch.profiler per rank, a Chrome trace next to the JSON and the top kernels in the log")
    p.add_argument("--bursts", type=int, default=None,
                   help="graphed rows: also time this many back-to-back calls without a host sync in between "
                        "(JSON 'burst_ms'; default 20 on a GPU, 0 = off)")
    p.add_argument("--timed-ms", type=float, default=None,
                   help=f"least timed time per column of a row; default {timing.TIMED_MS:.0f} on a GPU, 0 on a CPU "
                        "(--iters calls only)")


def bench_main(args) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if args.quick and args.model == "tiny" and args.layers is None:
        args.layers = 1
    args.ctx = args.ctx or (16 if args.quick else 128)
    args.steps = args.steps or (4 if args.quick else 128)
    args.iters = args.iters or (3 if args.quick else 20)
    config, dtype, device = model_setup(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "timing": {"rounds": args.rounds, "iters_min": args.iters,
                       "timed_ms_min": args.timed_ms if args.timed_ms is not None else
                       (1500.0 if device.type == "cuda" else 0.0)},
            "machine": machine(device), "versions": versions(), "world": world, "device": str(device),
            "dtype": str(dtype).split(".")[-1], "model": args.model, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "strategy": args.strategy}
    tag = args.tag or (meta["machine"].get("gpu", "cpu").replace("NVIDIA ", "").replace(" ", "-").lower())
    stamp = [datetime.datetime.now().strftime("%Y%m%d-%H%M%S")]
    if dist.is_initialized() and world > 1:      # rank 0's: one stem for every rank's trace files
        dist.broadcast_object_list(stamp, src=0)
    stamp = stamp[0]
    stem = os.path.join(args.out, f"{'check' if args.check else 'bench'}-{tag}-tp{world}-{stamp}")
    timing.WARMUP_MS = args.warmup_ms
    timing.ROUNDS = args.rounds
    timing.TIMED_MS = args.timed_ms if args.timed_ms is not None else (1500.0 if device.type == "cuda" else 0.0)
    prior = {}
    if args.resume and not args.check:
        with open(args.resume) as f:
            prior = json.load(f)
        stem = args.resume[:-5] if args.resume.endswith(".json") else args.resume
        args.large_batch = args.large_batch or prior.get("large_batch")
    if args.check:
        res = {**meta, **check(args, config, dtype, device, rank, world)}
        say(json.dumps(res, indent=2))
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(stem + ".json", "w") as f:
                json.dump(res, f, indent=2)
        return res

    from tabulate import tabulate

    avail = [c for c in args.columns.split(",") if c != "async_tp" or (device.type == "cuda" and world > 1)]
    if "async_tp" in avail:  # async TP's fused ops run on symmetric memory
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        enable_symm_mem_for_group(dist.group.WORLD.group_name)
    ctx = {"timer": Timer(device), "device": device, "world": world, "rank": rank, "dtype": dtype, "infer": {}}
    models: dict = {}

    def get_model(plan):
        if plan not in models:
            models.clear()
            free_model(ctx)
            models[plan] = build_sharded(config, plan, dtype=dtype, device=device, seed=args.seed)
        return models[plan]

    large = large_batch(args, config, device, world) if not args.quick else (args.large_batch or 8)
    if device.type == "cuda" and not args.quick and not args.large_batch:
        get_model("hf")
        large = large_batch(args, config, device, world, copies=len([c for c in avail if c != "async_tp"]))
    rows = rows_for(args, large)
    if args.cases:
        specs = [c.strip() for c in args.cases.split(",") if c.strip()]
        rows = [r for r in rows if any(r.name == c[1:] if c.startswith("=") else c in r.name for c in specs)]
    results = {r.name: {"graph": "yes" if device.type == "cuda" and (r.decode or r.group in ("mlp", "attn"))
                        else "no"} for r in rows}
    errors = dict(prior.get("errors", {}))
    for prow in prior.get("rows", []):            # --resume: keep every cell already measured
        if prow["case"] in results:
            for c in prior.get("columns", []):
                v = prow.get(f"{HEADERS.get(c, c)} ms")
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    results[prow["case"]][c] = float(v)
    ctx["infer"].update(prior.get("inference", {}))
    notes = [f"TP={world}; decode large batch = {large} (largest <= 4096 that fits)" if not args.quick else
             "quick mode (tiny model)", "E2E prefill rows keep the last position's logits (logits_to_keep=1)",
             "async-TP: torch_sp plan; S=1 decode and the inference loop use the torch plan (SP cannot shard S=1)",
             "E2E decode bsz=128 and inference attend over a ctx+steps static cache; other decode rows ctx+1",
             "bound: tdist strategy='bound', every collective replaced by a no-op of the same shape -- "
             "timing only, NOT a valid output; the limit of comm hiding",
             "gap closed = (inductor - tdist) / (inductor - bound); vs best baseline = min(eager, inductor, "
             "async-TP) / tdist",
             "ops_by_column: per row and column, the tdist op implementations that column's code runs "
             "(seen while it compiled, captured and warmed up; auto's measurements while compiling excluded); "
             "tdist_ops_ran: the same for the tdist column; empty = the tdist column ran Inductor's own code",
             "burst_ms: graphed rows, ms per call of back-to-back calls with no host sync in between "
             "(timing.measure_bursts): without the per-call start skew across ranks that the main columns pay"]

    ran = dict(prior.get("tdist_ops_ran", {}))
    by_column = dict(prior.get("ops_by_column", {}))
    traced: dict = {}
    burst: dict = dict(prior.get("burst_ms", {}))
    n_burst = args.bursts if args.bursts is not None else (20 if device.type == "cuda" else 0)

    def save(done: list) -> dict:  # after every row / column, so a run cut short keeps what it measured
        tab = table(results, rows, done)
        res = {**meta, "large_batch": large, "iters": args.iters, "columns": done, "rows": tab,
               "tdist_ops_ran": ran, "ops_by_column": by_column, "traces": traced, "burst_ms": burst,
               "inference": ctx["infer"], "errors": errors, "notes": notes, "complete": all(c in done for c in avail),
               "op_graphs": dict(op_graphs.STATS)}
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(stem + ".json", "w") as f:
                json.dump(res, f, indent=2)
            plot(tab, done, stem + ".png", f"speedup, Qwen3 {config.num_hidden_layers} layers, TP={world}, "
                                     f"{meta['machine'].get('gpu', 'CPU')}")
        return res

    from tdcompile.ops import cuda as opc, op_graphs
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # several backends
    rank_of = {"eager": 0, "inductor": 1, "async_tp": 2, "bound": 3, "tdist": 4}   # baselines first
    order = sorted(avail, key=lambda c: rank_of.get(c, 5))
    prior_cols = [c for c in prior.get("columns", []) if c not in avail]
    shown = lambda: [c for c in order if any(isinstance(results[r.name].get(c), float) for r in rows)] + prior_cols  # noqa: E731

    def cell(row, column, value, note=""):
        results[row.name][column] = round(value, 4) if isinstance(value, float) else value
        say(f"[bench] {column:9s} {row.name:34s} {results[row.name][column]} ms{note}", flush=True)

    # async-TP runs another plan (model): column by column, first (a baseline)
    for column in [c for c in order if c == "async_tp"]:
        for row in rows:
            if isinstance(results[row.name].get(column), float):
                continue
            try:
                with torch.no_grad():
                    model = get_model(plan_for(column, row))
                    if row.group == "infer":
                        cell(row, column, run_infer(row, column, model, args, ctx))
                    else:
                        fn, rewind, graph = prepare_row(row, column, model, args, ctx)
                        cell(row, column, measure(fn, ctx["timer"], args.iters, graph, rewind))
            except Exception as e:  # noqa: BLE001  (a failed cell is reported, not fatal)
                errors[f"{row.name} / {column}"] = f"{type(e).__name__}: {str(e)[:300]}"
                cell(row, column, "error")
            ctx.pop("engines", None)
            torch._dynamo.reset()
        res = save(shown())
    # the HF-plan columns share one model and are measured together, interleaved per row
    group = [c for c in order if c != "async_tp"]
    for row in rows:
        todo = [c for c in group if not isinstance(results[row.name].get(c), float)]
        if not todo:
            continue
        model = get_model("hf")
        seen = [dict(opc.RAN_IMPL)]   # columns are prepared one after another: the ops each one ran
        cols_ops: dict = {}

        def prepared(column):         # what ran since the last call is ``column``'s
            now = dict(opc.RAN_IMPL)
            cols_ops.setdefault(column, set()).update(
                f"{op}={impl}" for (op, impl), n in now.items() if n > seen[0].get((op, impl), 0))
            seen[0] = now
        cases = {}
        with torch.no_grad():
            for column in todo:
                try:
                    if row.group == "infer":
                        cell(row, column, run_infer(row, column, model, args, ctx))
                    else:
                        seen[0] = dict(opc.RAN_IMPL)
                        cases[column] = prepare_row(row, column, model, args, ctx)   # may compile + capture
                        prepared(column)
                except Exception as e:  # noqa: BLE001
                    errors[f"{row.name} / {column}"] = f"{type(e).__name__}: {str(e)[:300]}"
                    cell(row, column, "error")
            def after(runs, row=row):
                if args.trace:
                    traced.update(trace_row(runs, row, args.trace.split(","), stem, rank, say))
                # graphed rows only: layer rows graphed here, E2E decode inside the Engine (its prefill
                # reads the cache position on the host, so back-to-back calls would sync anyway)
                if n_burst and runs and (row.decode or all(cases[c][2] for c in runs)):
                    try:   # an extra measurement: a failure must not cost the row's timed results
                        b = measure_bursts(runs, ctx["timer"], n_burst)
                    except Exception as e:  # noqa: BLE001
                        errors[f"{row.name} / back to back"] = f"{type(e).__name__}: {str(e)[:300]}"
                        return
                    burst[row.name] = {c: round(v, 4) for c, v in b.items()}
                    say(f"[bench] back to back ({n_burst} calls) {row.name}: "
                        + ", ".join(f"{c} {v:.4f}" for c, v in burst[row.name].items()) + " ms", flush=True)
            try:
                timed = measure_interleaved(cases, ctx["timer"], args.iters, prepared=prepared, after_timing=after)
                for column, ms in timed.items():
                    cell(row, column, ms)
            except Exception as e:  # noqa: BLE001
                errors[f"{row.name} / {','.join(cases)}"] = f"{type(e).__name__}: {str(e)[:300]}"
                for column in cases:
                    cell(row, column, "error")
        by_column[row.name] = {c: sorted(cols_ops.get(c, ())) for c in cases}
        ran[row.name] = by_column[row.name].get("tdist", [])
        ctx.pop("engines", None)
        torch._dynamo.reset()
        res = save(shown())
    models.clear()
    free_model(ctx)
    say(tabulate(res["rows"], headers="keys", tablefmt="github", floatfmt=".3f"))
    say(f"saved {stem}.json and {stem}.png")
    if errors:
        say("errors:\n" + "\n".join(f"  {k}: {v}" for k, v in errors.items()))
    res["json"], res["png"] = stem + ".json", stem + ".png"
    return res


def main(argv=None) -> dict:  # python -m tdcompile.bench, or torchrun --nproc_per_node=N -m tdcompile.bench
    from tdcompile.generate import init_from_env

    p = argparse.ArgumentParser(description=__doc__)
    add_bench_args(p)
    init_from_env()
    return bench_main(p.parse_args(argv))


if __name__ == "__main__":
    main()
