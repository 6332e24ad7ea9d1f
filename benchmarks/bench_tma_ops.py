"""The fused ops on the TMA GEMM against their other variants, real processes, Qwen3-32B shapes.

    torchrun --nproc_per_node W benchmarks/bench_tma_ops.py --out DIR [--m 4096,1024]

**All-gather + GEMM(s)**, per M (gathered rows) and weight group at TP=W (q,k,v: N = 8192/W, 1024/W, 1024/W; gate,up:
N = 25600/W each; K = 5120), bf16, every column the max over ranks of the per-call median of
CUDA-graph replays (µs):

* ``unfused``: NCCL all_gather_into_tensor, then one cuBLAS GEMM per weight (what Inductor runs);
* ``ce``: ``kernels/all_gather_gemm_ce.py`` (cuBLAS per shard and weight, copy-engine pulls);
* ``tma``: ``kernels/all_gather_gemm_tma.py`` (one TMA GEMM per weight over all shards, tiles
  waiting on per-shard flags);
* ``fused``: ``kernels/all_gather_gemm.py`` (the pointer-load Triton GEMM, same protocol);
* ``bound``: cuBLAS on the gathered A, no communication; ``tma_local``: the TMA GEMM alone.

**GEMM + reduce-scatter**, o_proj (K = 8192/W) and down_proj (K = 25600/W), N = 5120, M rows in:
``unfused`` (cuBLAS, then NCCL reduce_scatter_tensor), ``ce``, ``tma``
(``kernels/gemm_reduce_scatter_tma.py``: one TMA GEMM, pushes as each destination completes),
``fused`` (pointer-load GEMM storing into peers), ``bound`` (cuBLAS alone), ``tma_local``.

Every variant is first checked against ``unfused`` (relative error < 2e-2).  Writes
DIR/tma-ops-{gpu}-w{W}-{date}.json with machine, versions and command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from tdcompile.launch import SAFE_ENV  # noqa: E402

os.environ.update(SAFE_ENV)            # NVLink multicast stays off (forced, before any process group)
os.environ.setdefault("TDCOMPILE_SPIN_TIMEOUT_S", "20")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HIDDEN, INTER, Q, KV = 5120, 25600, 64 * 128, 8 * 128


def graph_us(fn, calls: int, replays: int) -> float:
    """``measure.graph_us`` (per-call median of a CUDA graph of ``calls`` calls), max over ranks."""
    from tdcompile import measure
    dist.barrier()
    t = torch.tensor([measure.graph_us(fn, calls, replays)], device="cuda")
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
    from tdcompile.kernels.all_gather_gemm import all_gather_gemm
    from tdcompile.kernels.all_gather_gemm_ce import all_gather_gemm_ce
    from tdcompile.kernels.all_gather_gemm_tma import all_gather_gemm_tma
    from tdcompile.kernels.all_gather_gemm_tma import unsupported_reason as ag_reason
    from tdcompile.kernels.gemm_reduce_scatter import gemm_reduce_scatter
    from tdcompile.kernels.gemm_reduce_scatter_ce import gemm_reduce_scatter_ce
    from tdcompile.kernels.gemm_reduce_scatter_tma import gemm_reduce_scatter_tma
    from tdcompile.kernels.gemm_reduce_scatter_tma import unsupported_reason as rs_reason
    from tdcompile.kernels.gemm_tma import tma_gemm
    from tdcompile.kernels.symm import get_workspace
    ws = get_workspace(dist.group.WORLD.group_name)
    dt = torch.bfloat16
    rows = []
    for M in ms:
        m = M // W
        for gname, Ns in {"q,k,v": [Q // W, KV // W, KV // W], "gate,up": [INTER // W, INTER // W]}.items():
            torch.manual_seed(rank)
            shard = torch.randn(m, HIDDEN, device="cuda", dtype=dt)                     # [m, K] this rank's rows
            torch.manual_seed(1234)
            bs = [(torch.randn(N, HIDDEN, device="cuda", dtype=dt) * 0.02).t() for N in Ns]   # [K, N] views
            A = torch.empty(M, HIDDEN, device="cuda", dtype=dt)                         # [M, K] gathered
            Ag = torch.randn(M, HIDDEN, device="cuda", dtype=dt)                        # [M, K] for the bounds

            def ag_unfused(A=A, shard=shard, bs=bs):
                dist.all_gather_into_tensor(A, shard)
                return A, [A @ b for b in bs]

            impls = {"ce": lambda shard=shard, bs=bs: all_gather_gemm_ce(ws, shard, bs, True),
                     "tma": lambda shard=shard, bs=bs: all_gather_gemm_tma(ws, shard, bs, True),
                     "fused": lambda shard=shard, bs=bs: all_gather_gemm(ws, shard, bs, True)}
            rows.append(measure(args, ws, {"op": "all_gather_gemm", "W": W, "M": M, "weights": gname, "N": Ns,
                                           "K": HIDDEN}, ag_unfused, impls, ag_reason(ws, shard, bs),
                                lambda Ag=Ag, bs=bs: [Ag @ b for b in bs],
                                lambda Ag=Ag, bs=bs: [tma_gemm(Ag, b) for b in bs]))
        for pname, K in (("o_proj", Q // W), ("down_proj", INTER // W)):
            torch.manual_seed(rank)
            a = torch.randn(M, K, device="cuda", dtype=dt)                              # [M, K] this rank's partial
            torch.manual_seed(4321)
            b = (torch.randn(HIDDEN, K, device="cuda", dtype=dt) * 0.02).t()            # [K, N] view
            out = torch.empty(m, HIDDEN, device="cuda", dtype=dt)                       # [M/W, N]

            def rs_unfused(a=a, b=b, out=out):
                dist.reduce_scatter_tensor(out, a @ b)
                return None, [out]

            impls = {"ce": lambda a=a, b=b: (None, [gemm_reduce_scatter_ce(ws, a, b)]),
                     "tma": lambda a=a, b=b: (None, [gemm_reduce_scatter_tma(ws, a, b)]),
                     "fused": lambda a=a, b=b: (None, [gemm_reduce_scatter(ws, a, b)])}
            rows.append(measure(args, ws, {"op": "gemm_reduce_scatter", "W": W, "M": M, "proj": pname,
                                           "N": HIDDEN, "K": K}, rs_unfused, impls, rs_reason(ws, a, b, None),
                                lambda a=a, b=b: a @ b, lambda a=a, b=b: tma_gemm(a, b)))
    if rank == 0:
        write(args, W, rows)
    dist.destroy_process_group()


def measure(args, ws, r: dict, unfused, impls: dict, tma_unsupported, bound, tma_local) -> dict:
    """Check every impl against ``unfused`` (its first call behind a host barrier: every rank
    compiles before any kernel waits on a peer), then time it; ``bound`` and ``tma_local`` (no
    communication) after them."""
    _, ref = unfused()
    ref = [c.clone() for c in ref]
    r["unfused"] = graph_us(unfused, args.calls, args.replays)
    for name, fn in impls.items():
        if name == "tma" and tma_unsupported:
            r[name] = f"unsupported: {tma_unsupported}"
            continue
        try:
            ws.phase_barrier = dist.barrier
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
        except Exception as e:                                                      # noqa: BLE001 (recorded)
            r[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    r["bound"] = graph_us(bound, args.calls, args.replays)
    r["tma_local"] = graph_us(tma_local, args.calls, args.replays)
    for name in ("ce", "tma", "fused", "bound"):
        if isinstance(r.get(name), float) and isinstance(r["unfused"], float):
            r[f"{name}_vs_unfused"] = round(r[name] / r["unfused"], 3)
    if dist.get_rank() == 0:
        print(json.dumps(r), flush=True)
    return r


def write(args, W: int, rows: list) -> None:
    import triton
    props = torch.cuda.get_device_properties(0)
    date = datetime.datetime.now(datetime.timezone.utc)
    doc = {"kind": "tma_ops", "mode": "real", "world": W, "date": date.isoformat(timespec="seconds"),
           "machine": {"gpu": props.name, "sms": props.multi_processor_count, "gpus": torch.cuda.device_count()},
           "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
           "command": " ".join(["torchrun", f"--nproc_per_node {W}"] + sys.argv),
           "timing": f"max over ranks of the median of {args.replays} replays of a CUDA graph of {args.calls} calls, "
                     "µs per call; *_vs_unfused = time / unfused time (< 1: faster)",
           "results": rows}
    gpu = props.name.lower().replace("nvidia ", "").replace(" ", "-")
    path = os.path.join(args.out, f"tma-ops-{gpu}-w{W}-{date:%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
