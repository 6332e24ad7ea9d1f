"""Why the copy-engine GEMM + all-reduce (``fused:ce<C>``) hides so little of the all-reduce at
prefill sizes: the pieces of its schedule timed one by one (real processes, CUDA graphs).

    torchrun --nproc_per_node W scripts/overlap_probe.py --out DIR

For the two Qwen3-32B GEMMs that feed an all-reduce (o_proj K=8192/W, down_proj K=25600/W;
M=4096, N=5120, bf16), and for several row splits of M (``SPLITS``):

* ``gemm``        cuBLAS on all M rows at once;
* ``chunks``      the same GEMM as the split's row chunks, back to back (what chunking costs
                  the GEMM alone: wave quantization, smaller tiles);
* ``ce``          ``kernels.gemm_all_reduce_ce`` with that split (the whole fused op);
* ``nccl``        NCCL all-reduce of the [M, N] output;
* ``pull``        a copy-engine pull of 1/W of the output from the next rank's symmetric buffer
                  (bytes per microsecond = the CE's NVLink rate), alone and beside the GEMM.

Every number is the median of CUDA-graph replays, the max over ranks.  Writes
``overlap-probe-w<W>.json``.  A diagnostic: its numbers decide which splits become candidates.
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

SPLITS = {   # name -> row fractions of M (each chunk rounded to 128 rows, the last takes the rest)
    "eq2": [1 / 2, 1 / 2], "eq4": [1 / 4] * 4, "dec2": [2 / 3, 1 / 3], "dec3": [4 / 7, 2 / 7, 1 / 7],
    "tail4": [3 / 4, 1 / 4], "tail8": [7 / 8, 1 / 8], "w26": [26 / 32, 6 / 32],
}


def bounds(m: int, fracs: list) -> list:
    out, lo = [], 0
    for i, f in enumerate(fracs):
        hi = m if i == len(fracs) - 1 else lo + max(128, int(round(f * m / 128)) * 128)
        out.append((lo, min(hi, m)))
        lo = min(hi, m)
    return out


def trace_ce(a, ws, ce, rank: int, W: int, M: int, N: int, dt, g) -> None:
    """Where a ``ce`` call's tail goes: which of its kernels and copies wait, on every rank
    (``overlap-probe-trace-w<W>-<split>-rank<r>.json``, Chrome format; one graph replay holds 3 calls)."""
    K = 25600 // W
    bs = bounds(M, SPLITS[a.trace])
    x = torch.randn(M, K, device="cuda", dtype=dt, generator=g) / K ** 0.5           # [M, K]
    w = torch.randn(K, N, device="cuda", dtype=dt, generator=g)                      # [K, N]
    o = torch.empty(M, N, device="cuda", dtype=dt)                                   # [M, N]
    ws.phase_barrier = dist.barrier
    try:
        ce.gemm_all_reduce_ce(ws, x, w, None, bs, out=o)
    finally:
        ws.phase_barrier = None
    from tdcompile.measure import capture
    graph = capture(lambda: ce.gemm_all_reduce_ce(ws, x, w, None, bs, out=o), 3)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    prof.export_chrome_trace(os.path.join(a.out, f"overlap-probe-trace-w{W}-{a.trace}-rank{rank}.json"))
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--trace", default=None, help="split name (e.g. eq4): also write a torch.profiler trace per "
                   "rank of 3 graph replays of ``ce`` with that split at down_proj's K")
    a = p.parse_args()
    rank, W = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    from tdcompile.kernels import gemm_all_reduce_ce as ce
    from tdcompile.kernels.symm import get_workspace
    from tdcompile.measure import graph_us
    ws = get_workspace(dist.group.WORLD.group_name)
    M, N, dt = a.m, 5120, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(rank)
    side = torch.cuda.Stream()
    rows = []

    def timed(name, fn, **kw):
        try:
            fn()
            torch.cuda.synchronize()
            us = graph_us(fn)
        except Exception as e:  # noqa: BLE001
            us = float("nan")
            print(f"[{rank}] {name} {kw}: {type(e).__name__}: {e}", flush=True)
        t = torch.tensor([us], device="cuda", dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows.append(dict(what=name, us=round(float(t.item()), 1), **kw))
        if rank == 0:
            print(f"{name:8s} {json.dumps(kw):48s} {t.item():8.1f} us", flush=True)

    for K in (8192 // W, 25600 // W):
        x = torch.randn(M, K, device="cuda", dtype=dt, generator=g) / K ** 0.5        # [M, K]
        w = torch.randn(K, N, device="cuda", dtype=dt, generator=g)                  # [K, N]
        o = torch.empty(M, N, device="cuda", dtype=dt)                               # [M, N]
        timed("gemm", lambda: torch.mm(x, w, out=o), K=K)
        timed("nccl", lambda: dist.all_reduce(o), K=K)
        for name, fr in SPLITS.items():
            bs = bounds(M, fr)

            def chunks(bs=bs):
                for lo, hi in bs:
                    torch.mm(x[lo:hi], w, out=o[lo:hi])                              # [hi-lo, N] rows in place
            timed("chunks", chunks, K=K, split=name, bounds=bs)
            ws.phase_barrier = dist.barrier      # first launch: no rank waits on a peer still compiling
            try:
                ce.gemm_all_reduce_ce(ws, x, w, None, bs)
            finally:
                ws.phase_barrier = None
            timed("ce", lambda bs=bs: ce.gemm_all_reduce_ce(ws, x, w, None, bs), K=K, split=name, bounds=bs)
        data, _ = ce.regions(ws, N, 2)
        peer = (rank + 1) % W
        for frac in (1 / W, 1 / 2):
            rows_n = int(M * frac)
            src = data.peers[peer][: rows_n * N * 2].view(dt).view(rows_n, N)        # [rows, N] on the next rank
            dst = torch.empty(rows_n, N, device="cuda", dtype=dt)
            timed("pull", lambda: dst.copy_(src), K=K, rows=rows_n, mbytes=round(rows_n * N * 2 / 1e6, 2))

            def pull_beside_gemm():
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    dst.copy_(src)
                torch.mm(x, w, out=o)
                torch.cuda.current_stream().wait_stream(side)
            timed("pull+gemm", pull_beside_gemm, K=K, rows=rows_n)
        dist.barrier()
    if a.trace:
        trace_ce(a, ws, ce, rank, W, M, N, dt, g)
    if rank == 0:
        import triton
        path = os.path.join(a.out, f"overlap-probe-w{W}.json")
        with open(path, "w") as f:
            json.dump({"mode": "real", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv), "world": W, "gpu": torch.cuda.get_device_name(),
                       "versions": {"torch": torch.__version__, "triton": triton.__version__},
                       "m": M, "n": N, "dtype": "bfloat16", "rows": rows}, f, indent=1)
        print(f"saved {path}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
