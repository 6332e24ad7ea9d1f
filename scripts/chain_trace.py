"""Where the chain GEMM + all-reduce (``fused:chain<L>``) spends the time after its GEMMs: one
CUDA-graph replay of 3 calls under torch.profiler, every GPU event (kernels, copies) per rank.

    torchrun --nproc_per_node W scripts/chain_trace.py --out DIR [--levels 2] [--k 4096]

M=4096, N=5120, bf16; K defaults to o_proj's 8192 / W.  Also times (CUDA graphs, median, this
rank) the whole op, its chunk GEMMs alone (the same ``mm`` / ``addmm_`` calls back to back) and
cuBLAS on all rows.  Writes ``chain-trace-w<W>-rank<r>.json``: the timings and, for the last
of the 3 calls, each event's stream, start and duration (us from the call's first GPU event).
A diagnostic for the next change to ``kernels/gemm_all_reduce_chain.py``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def events(prof) -> list:
    """(start us, duration us, stream, category, name) of every GPU event, in start order."""
    path = f"/tmp/chain-trace-{os.getpid()}.json"
    prof.export_chrome_trace(path)
    ev = json.load(open(path))["traceEvents"]
    os.remove(path)
    out = [(float(e["ts"]), float(e.get("dur", 0)), e.get("args", {}).get("stream", e.get("tid")), e["cat"],
            e["name"][:60]) for e in ev if e.get("cat") in GPU_CATS]
    return sorted(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--k", type=int, default=0, help="0: o_proj's 8192 / W")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rank, W = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    from tdcompile.kernels import gemm_all_reduce_chain as chain
    from tdcompile.kernels.symm import get_workspace
    from tdcompile.measure import capture, graph_us
    from tdcompile.ops.overlap import chunk_bounds
    ws = get_workspace(dist.group.WORLD.group_name)
    M, N, K, dt = a.m, 5120, a.k or 8192 // W, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(M, K, device="cuda", dtype=dt, generator=g) / K ** 0.5          # [M, K]
    w = torch.randn(K, N, device="cuda", dtype=dt, generator=g)                     # [K, N]
    o = torch.empty(M, N, device="cuda", dtype=dt)                                  # [M, N]
    bs = chunk_bounds(M, W * a.levels)
    ws.phase_barrier = dist.barrier
    try:
        chain.gemm_all_reduce_chain(ws, x, w, None, bs, out=o)
    finally:
        ws.phase_barrier = None
    torch.cuda.synchronize()

    def gemms():                           # the op's cuBLAS calls alone, in its order
        for c, pos in chain.schedule(W, rank, a.levels):
            lo, hi = bs[c]
            if pos == 0:
                torch.mm(x[lo:hi], w, out=o[lo:hi])
            else:
                o[lo:hi].addmm_(x[lo:hi], w)

    times = {}
    for name, fn in [("gemm", lambda: torch.mm(x, w, out=o)), ("chunk_gemms", gemms),
                     ("chain", lambda: chain.gemm_all_reduce_chain(ws, x, w, None, bs, out=o))]:
        dist.barrier()
        times[name] = round(graph_us(fn), 1)
    graph = capture(lambda: chain.gemm_all_reduce_chain(ws, x, w, None, bs, out=o), 3)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    ws.check(sync=True)
    ev = events(prof)
    per_call = len(ev) // 3
    last = ev[len(ev) - per_call:] if per_call else []
    t0 = last[0][0] if last else 0.0
    rows = [{"start_us": round(t - t0, 1), "dur_us": round(d, 1), "stream": st, "cat": cat, "name": n}
            for t, d, st, cat, n in last]
    import triton
    path = os.path.join(a.out, f"chain-trace-w{W}-rank{rank}.json")
    with open(path, "w") as f:
        json.dump({"mode": "real", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "command": " ".join(sys.argv), "world": W, "rank": rank, "gpu": torch.cuda.get_device_name(),
                   "versions": {"torch": torch.__version__, "triton": triton.__version__},
                   "m": M, "n": N, "k": K, "levels": a.levels, "bounds": bs, "times_us": times,
                   "events_per_call": per_call, "last_call": rows}, f, indent=1)
    print(f"rank {rank}: {times}; last call spans {rows[-1]['start_us'] + rows[-1]['dur_us'] if rows else 0:.1f} us; "
          f"saved {path}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
