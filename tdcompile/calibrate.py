"""``tdcompile calibrate``: fill the measured table for a model's shapes, fit the analytic model.

    torchrun --nproc_per_node 2 -m tdcompile.cli calibrate --model qwen3-32b --m 128,4096

1. **Measured table** (what ``strategy="auto"`` decides from on a GPU): for every op and shape
   the model produces under tensor parallelism (``model_keys``) at each M bucket, every
   candidate implementation is timed on all ranks together (``measure.py``); the table is
   saved to the user cache (and with ``--ship``, into the package's shipped tables).
2. **Device profile** (the analytic model, used only where no GPU can measure): the cuBLAS
   GEMM rate, HBM bandwidth, launch overhead, NCCL latency/bandwidth fitted to the measured
   all-reduces, and the P2P link bandwidth; what cannot be measured is kept from the base
   profile and listed under ``extra["not_measured"]``. The prediction error of the fitted
   model against every measured entry is printed and saved.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics

import torch
import torch.distributed as dist

from tdcompile.cost_model import DeviceProfile, profile_for_device


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None, help="profile to start from (default: shipped one for this GPU, else h200)")
    p.add_argument("--out", default="tdist_profile.json", help="where to save the fitted device profile")
    p.add_argument("--model", default=None, help="fill the measured table for this model's TP shapes ('qwen3-32b')")
    p.add_argument("--rows", default="128,4096", help="comma-separated M (tokens) to measure; each fills its M bucket")
    p.add_argument("--sp", action="store_true", help="also measure the sequence-parallel ops (AG-GEMM, GEMM-RS)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="activation dtype")
    p.add_argument("--report", default=None, help="write the measured entries and prediction errors to this JSON")
    p.add_argument("--ship", action="store_true", help="also write the table into tdcompile/profiles/measured/")
    p.add_argument("--reuse", action="store_true",
                   help="keep table entries (cache or shipped) that have every candidate instead of measuring "
                        "every shape afresh")


def model_keys(config, world: int, ms: list, dtype, sp: bool = False) -> list:
    """The measured-table keys of a Qwen3/Llama-style decoder under TP=``world`` (HF plan:
    o_proj / down_proj -> all_reduce, alone or with the residual add + RMSNorm after it; with ``sp``: q,k,v and gate,up as AG-GEMM, o_proj and
    down_proj as GEMM-RS), at each M in ``ms``."""
    from tdcompile.measured import Key
    H, D = config.hidden_size, getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    q, kv, inter = config.num_attention_heads * D, config.num_key_value_heads * D, config.intermediate_size
    keys = []
    for m in ms:
        kw = dict(m=m, dtype=dtype, world=world)
        keys += [Key.of("gemm_all_reduce", n=H, k=q // world, **kw), Key.of("gemm_all_reduce", n=H, k=inter // world, **kw),
                 Key.of("all_reduce", n=H, k=0, **kw), Key.of("all_reduce_rmsnorm", n=H, k=0, **kw),
                 Key.of("gemm_all_reduce_rmsnorm", n=H, k=q // world, **kw),             # o_proj -> post-attn norm
                 Key.of("gemm_all_reduce_rmsnorm", n=H, k=inter // world, **kw)]         # down -> next input norm
        if sp and m % world == 0:
            keys += [Key.of("all_gather_gemm", n=(q + 2 * kv) // world, k=H, **kw),
                     Key.of("all_gather_gemm", n=2 * inter // world, k=H, **kw),
                     Key.of("gemm_reduce_scatter", n=H, k=q // world, **kw),
                     Key.of("gemm_reduce_scatter", n=H, k=inter // world, **kw),
                     Key.of("gemm", n=(q + 2 * kv) // world, k=H, **kw),         # the AG-GEMMs' GEMMs alone
                     Key.of("gemm", n=2 * inter // world, k=H, **kw)]
    return sorted(set(keys), key=lambda k: k.id())


def with_stale(keys: list, tab, say=print) -> list:
    """``keys`` plus every key of ``tab`` with a candidate measured on code changed since
    (``Table.stale``), in rank 0's order (every rank must measure the same keys).

    Why: ``--reuse`` after a change to the op dispatch path must refresh every entry that the change
    made stale, not only the shapes asked for. On 4xH200 (``session-h200-tp4-opg-20261127-2118.log``)
    a ``--reuse`` run without ``--sp`` left the AG-GEMM / GEMM-RS host entries stale, so the
    sequence-parallel form could not be costed and E2E prefill at TP=4 kept the all_reduce form."""
    from tdcompile.measured import Key
    ids = {k.id() for k in keys}
    extra = [k for k in map(Key.parse, sorted(tab.entries)) if k.id() not in ids and tab.stale(k)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [extra]
        dist.broadcast_object_list(box, src=0)
        extra = box[0]
    if extra:
        say(f"[calibrate] --reuse: also refreshing {len(extra)} stale entries: {', '.join(k.id() for k in extra)}")
    return list(keys) + extra


def fill_table(keys: list, group_name: str, say=print, reuse: bool = False) -> dict:
    """Measure every key afresh (``reuse``: agree on cached entries that have every candidate);
    returns ``{key id: (times, source)}``."""
    from tdcompile import measure, measured
    out = {}
    for i, key in enumerate(keys):
        times, source = measure.agreed(key, group_name, fresh=not reuse)
        out[key.id()] = (times, source)
        best, why = measured.choose(times, key.m)
        graphed = measured.choose(times, key.m, charge_host=False)[0]
        say(f"[calibrate] {i + 1}/{len(keys)} {key.id():58s} {source:8s} -> {best} (graphed: {graphed}) "
            + " ".join(f"{c}={t:.1f}" for c, t in times.items()), flush=True)
    return out


def fit_nccl(entries: dict, profile: DeviceProfile) -> dict:
    """NCCL latency + bus bandwidth fitted (least squares) to the measured unfused all_reduces."""
    from tdcompile.measured import Key
    pts = []
    for kid, (times, _) in entries.items():
        k = Key.parse(kid)
        if k.op == "all_reduce" and "unfused" in times:
            nbytes = k.m * k.n * torch.empty((), dtype=getattr(torch, k.dtype)).element_size()
            pts.append((2 * (k.world - 1) / k.world * nbytes, times["unfused"]))
    if len(pts) < 2:
        return {}
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    var = sum((x - mx) ** 2 for x, _ in pts)
    if var == 0:
        return {}
    slope = sum((x - mx) * (y - my) for x, y in pts) / var           # us per byte
    return {"nccl_gbps": 1e-3 / max(slope, 1e-12), "nccl_latency_us": max(my - slope * mx, 1.0)}


def kernel_results(entries: dict) -> list:
    """The measured entries as kernel-bench rows: op, M, N, K, unfused_us, fused_us (the best
    non-unfused candidate), which one, the auto choice, and every candidate's us."""
    from tdcompile.measured import HOST, Key, choose, device_times
    rows = []
    for kid, (all_times, source) in sorted(entries.items()):
        k = Key.parse(kid)
        times = device_times(all_times)
        fused = {c: t for c, t in times.items() if c != "unfused" and t != float("inf")}
        best = min(fused, key=fused.get) if fused else None
        rows.append({"op": k.op, "M": k.m, "N": k.n, "K": k.k, "dtype": k.dtype, "world": k.world,
                     "unfused_us": round(times.get("unfused", float("nan")), 1),
                     "fused_us": round(fused[best], 1) if best else None, "fused_impl": best,
                     "auto_choice": choose(all_times, k.m)[0],
                     "auto_choice_graphed": choose(all_times, k.m, charge_host=False)[0], "source": source,
                     "candidates_us": {c: (round(t, 1) if t != float("inf") else "failed") for c, t in times.items()},
                     "host_us": {c[len(HOST):]: (round(t, 1) if t != float("inf") else "failed")
                                 for c, t in all_times.items() if c.startswith(HOST)}})
    return rows


def prediction_errors(entries: dict, profile: DeviceProfile) -> list:
    """Per measured key and candidate the analytic model predicts: predicted vs measured us."""
    from tdcompile.cost_model import predict
    from tdcompile.measured import Key
    rows = []
    for kid, (times, _) in entries.items():
        k = Key.parse(kid)
        elem = torch.empty((), dtype=getattr(torch, k.dtype)).element_size()
        try:
            pred = predict(k.op, m=k.m, n=k.n, k=k.k, world_size=k.world, elem=elem, profile=profile)
        except ValueError:      # an op the analytic model does not cover (all_reduce_rmsnorm)
            continue
        for c, p in pred.items():
            meas = times.get(c)
            if meas is not None and meas != float("inf"):
                rows.append({"key": kid, "candidate": c, "predicted_us": round(p, 1), "measured_us": round(meas, 1),
                             "error": round((p - meas) / meas, 3)})
    return rows


def _median_us(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e3)
    return statistics.median(ts)


def measure_local(device) -> dict:
    dt = torch.bfloat16
    out = {}
    m = n = k = 8192
    a, b = torch.randn(m, k, device=device, dtype=dt), torch.randn(k, n, device=device, dtype=dt)
    out["gemm_tflops"] = 2 * m * n * k / (_median_us(lambda: a @ b) * 1e-6) / 1e12
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    out["hbm_gbps"] = 2 * x.numel() / (_median_us(lambda: y.copy_(x)) * 1e-6) / 1e9
    z = torch.empty(1, device=device)

    def hundred_launches():
        for _ in range(100):
            z.add_(1)
    out["launch_us"] = _median_us(hundred_launches, iters=10) / 100   # back to back: no event overhead
    return out


def measure_comm(device) -> dict:
    w, out = dist.get_world_size(), {}
    sizes = [1 << 20, 64 << 20]
    times = []
    for nbytes in sizes:
        t = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
        times.append(_median_us(lambda: dist.all_reduce(t)))
    algo = [2 * (w - 1) / w * s for s in sizes]
    slope = (times[1] - times[0]) / (algo[1] - algo[0])          # us per byte
    out["nccl_gbps"] = 1e-3 / slope
    out["nccl_latency_us"] = max(times[0] - algo[0] * slope, 1.0)
    try:  # P2P link bandwidth: copy-engine read of a peer's symmetric buffer
        import torch.distributed._symmetric_memory as symm_mem
        buf = symm_mem.empty(64 << 20, dtype=torch.uint8, device=device)
        hdl = symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
        peer = hdl.get_buffer((hdl.rank + 1) % w, (64 << 20,), torch.uint8)
        local = torch.empty_like(buf)
        out["link_gbps"] = (64 << 20) / (_median_us(lambda: local.copy_(peer)) * 1e-6) / 1e9
    except Exception as e:  # pragma: no cover - depends on the machine
        out["link_error"] = repr(e)
    return out


def calibrate_main(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("tdcompile calibrate measures GPUs; no CUDA device here")
    import json
    import os

    from tdcompile import measured as mt
    device = torch.device("cuda", torch.cuda.current_device())
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    say = print if rank0 else (lambda *a, **k: None)
    base_name = args.base or (profile_for_device().name if profile_for_device() else "h200")
    base = DeviceProfile.load(base_name)
    multi = dist.is_initialized() and dist.get_world_size() > 1
    entries = {}
    if args.model and multi:
        from tdcompile.models import get_config
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
        keys = model_keys(get_config(args.model), dist.get_world_size(), [int(m) for m in args.rows.split(",")],
                          dtype, sp=args.sp)
        if args.reuse:
            keys = with_stale(keys, mt.table(dist.get_world_size()), say)
        say(f"[calibrate] measuring {len(keys)} shapes of {args.model} at TP={dist.get_world_size()} "
            f"(every candidate, all ranks together, CUDA graphs)", flush=True)
        entries = fill_table(keys, dist.group.WORLD.group_name, say, reuse=args.reuse)
        tab = mt.table(dist.get_world_size())
        if rank0:
            say(f"[calibrate] table saved to {tab.save()}")
            if args.ship:
                path = os.path.join(mt._SHIPPED_DIR, mt.env_slug(tab.env) + ".json")
                sub = mt.Table.__new__(mt.Table)
                sub.env, sub.entries, sub.source = tab.env, {k: v for k, v in tab.entries.items()}, {}
                sub.digests = {k: v for k, v in tab.digests.items() if k in sub.entries}
                say(f"[calibrate] shipped table written to {sub.save(path)}")
    elif args.model:
        say("[calibrate] --model needs a process group of >= 2 GPUs (torchrun --nproc_per_node N)")
    local = measure_local(device)
    comm = measure_comm(device) if multi else {}
    comm.update(fit_nccl(entries, base))
    fields = {f.name for f in dataclasses.fields(DeviceProfile)}
    measured = {k: round(v, 2) for k, v in {**local, **comm}.items() if k in fields}
    not_measured = sorted(f for f in ("link_gbps", "p2p_latency_us", "nccl_latency_us", "nccl_gbps", "overlap",
                                      "fused_gemm_efficiency") if f not in measured)
    prof = dataclasses.replace(
        base, **measured, name=f"{base.name}-calibrated",
        source=f"tdcompile calibrate on {torch.cuda.get_device_name(device)} x{dist.get_world_size() if multi else 1}, "
               f"{datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}; base {base.name}",
        extra={"measured": {**local, **comm}, "not_measured": not_measured})
    errors = prediction_errors(entries, prof)
    if rank0:
        prof.save(args.out)
        say(f"saved {args.out}: {measured}; kept from {base.name}: {not_measured}")
        if errors:
            from tabulate import tabulate
            say(tabulate(errors, headers="keys", tablefmt="simple"))
        if args.report:
            import sys
            from tdcompile.bench import machine, versions
            with open(args.report, "w") as f:
                json.dump({"mode": "real", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                           "command": " ".join(sys.argv), "results": kernel_results(entries),
                           "machine": machine(device), "versions": versions(),
                           "world": dist.get_world_size() if multi else 1, "env": mt.environment(
                               dist.get_world_size() if multi else 1),
                           "entries": {k: {"times_us": t, "source": s,
                                           "choice": mt.choose(t, mt.Key.parse(k).m)[0]}
                                       for k, (t, s) in entries.items()},
                           "profile": dataclasses.asdict(prof), "prediction_errors": errors}, f, indent=1)
            say(f"[calibrate] report written to {args.report}")
