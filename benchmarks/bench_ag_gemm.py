"""All-gather + GEMM(s) on real processes: the kernel variants side by side, at Qwen3-32B shapes.

    torchrun --nproc_per_node W benchmarks/bench_ag_gemm.py --out DIR [--m 4096,1024]

Per M (gathered rows) and weight group at TP=W (q,k,v: N = 8192/W, 1024/W, 1024/W; gate,up:
N = 25600/W each; K = 5120), bf16, every column the max over ranks of the per-call median of
CUDA-graph replays (µs):

* ``unfused``: NCCL all_gather_into_tensor, then one cuBLAS GEMM per weight (what Inductor runs);
* ``ce``: ``kernels/all_gather_gemm_ce.py`` (cuBLAS per shard and weight, copy-engine pulls);
* ``tma``: ``kernels/all_gather_gemm_tma.py`` (one TMA GEMM per weight over all shards, tiles
  waiting on per-shard flags);
* ``fused``: ``kernels/all_gather_gemm.py`` (the pointer-load Triton GEMM, same protocol);
* ``bound``: cuBLAS on the gathered A, no communication; ``tma_local``: the TMA GEMM alone.

Every variant is first checked against ``unfused`` (relative error < 2e-2).  Writes
DIR/ag-gemm-{gpu}-w{W}-{date}.json with machine, versions and command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

from tdcompile.launch import SAFE_ENV  # noqa: E402

os.environ.update(SAFE_ENV)            # NVLink multicast stays off (forced, before any process group)
os.environ.setdefault("TDCOMPILE_SPIN_TIMEOUT_S", "20")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HIDDEN, INTER, Q, KV = 5120, 25600, 64 * 128, 8 * 128


def graph_us(fn, calls: int, replays: int) -> float:
    """Per-call median (µs) of a CUDA graph of ``calls`` calls; max over ranks."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    dist.barrier()
    g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    t = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return round(t.item(), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--m", default="4096,1024")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--replays", type=int, default=9)
    args = ap.parse_args()
    lr = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(lr)
    dist.init_process_group("nccl", device_id=torch.device("cuda", lr))
    rank, W = dist.get_rank(), dist.get_world_size()
    ms = [int(x) for x in args.m.split(",")]
    os.environ.setdefault("TDCOMPILE_MAX_M", str(max(ms)))
    import triton
    from tdcompile.kernels.all_gather_gemm import all_gather_gemm
    from tdcompile.kernels.all_gather_gemm_ce import all_gather_gemm_ce
    from tdcompile.kernels.all_gather_gemm_tma import all_gather_gemm_tma
    from tdcompile.kernels.all_gather_gemm_tma import unsupported_reason as tma_reason
    from tdcompile.kernels.gemm_tma import tma_gemm
    from tdcompile.kernels.symm import get_workspace
    ws = get_workspace(dist.group.WORLD.group_name)
    dt = torch.bfloat16
    groups = {"q,k,v": [Q // W, KV // W, KV // W], "gate,up": [INTER // W, INTER // W]}
    rows = []
    for M in ms:
        m = M // W
        for gname, Ns in groups.items():
            torch.manual_seed(rank)
            shard = torch.randn(m, HIDDEN, device="cuda", dtype=dt)                     # [m, K] this rank's rows
            torch.manual_seed(1234)
            bs = [(torch.randn(N, HIDDEN, device="cuda", dtype=dt) * 0.02).t() for N in Ns]   # [K, N] views
            A = torch.empty(M, HIDDEN, device="cuda", dtype=dt)                         # [M, K] gathered

            def unfused():
                dist.all_gather_into_tensor(A, shard)
                return A, [A @ b for b in bs]

            impls = {"unfused": unfused,
                     "ce": lambda: all_gather_gemm_ce(ws, shard, bs, True),
                     "tma": lambda: all_gather_gemm_tma(ws, shard, bs, True),
                     "fused": lambda: all_gather_gemm(ws, shard, bs, True)}
            r = {"W": W, "M": M, "weights": gname, "N": Ns, "K": HIDDEN}
            _, ref = unfused()
            ref = [c.clone() for c in ref]
            for name, fn in impls.items():
                if name == "tma" and tma_reason(ws, shard, bs):
                    r[name] = f"unsupported: {tma_reason(ws, shard, bs)}"
                    continue
                try:
                    ws.phase_barrier = dist.barrier     # first call: every rank compiles before any waits
                    try:
                        _, outs = fn()
                    finally:
                        ws.phase_barrier = None
                    ws.check(sync=True)
                    err = max(((o.float() - c.float()).norm() / c.float().norm()).item() for o, c in zip(outs, ref))
                    if err > 2e-2:
                        r[name] = f"wrong: rel err {err:.3g}"
                        continue
                    r[name] = graph_us(fn, args.calls, args.replays)
                    ws.check(sync=True)
                except Exception as e:                                              # noqa: BLE001 (recorded)
                    r[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            Ag = torch.randn(M, HIDDEN, device="cuda", dtype=dt)
            r["bound"] = graph_us(lambda: [Ag @ b for b in bs], args.calls, args.replays)
            r["tma_local"] = graph_us(lambda: [tma_gemm(Ag, b) for b in bs], args.calls, args.replays)
            for name in ("ce", "tma", "fused", "bound"):
                if isinstance(r.get(name), float) and isinstance(r["unfused"], float):
                    r[f"{name}_vs_unfused"] = round(r[name] / r["unfused"], 3)
            if rank == 0:
                print(json.dumps(r), flush=True)
            rows.append(r)
    if rank == 0:
        props = torch.cuda.get_device_properties(0)
        date = datetime.datetime.now(datetime.timezone.utc)
        doc = {"kind": "all_gather_gemm", "mode": "real", "world": W, "date": date.isoformat(timespec="seconds"),
               "machine": {"gpu": props.name, "sms": props.multi_processor_count, "gpus": torch.cuda.device_count()},
               "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
               "command": " ".join(["torchrun", f"--nproc_per_node {W}"] + sys.argv),
               "timing": f"max over ranks of the median of {args.replays} replays of a CUDA graph of {args.calls} calls, "
                         "µs per call; *_vs_unfused = time / unfused time (< 1: faster)",
               "results": rows}
        gpu = props.name.lower().replace("nvidia ", "").replace(" ", "-")
        path = os.path.join(args.out, f"ag-gemm-{gpu}-w{W}-{date:%Y%m%d-%H%M%S}.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        print("wrote", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
