"""GEMM alone on one GPU: cuBLAS vs our pointer-load Triton GEMM vs the TMA GEMM (every config).

    python3 benchmarks/bench_gemm.py --out DIR [--world 2,4] [--m 128,4096] [--picked] [--chain 4096,2]

The shapes are Qwen3-32B's per-rank projections at tensor-parallel degree W (hidden 5120,
intermediate 25600, 64 query heads and 8 KV heads of 128): q_proj and k_proj (the column-parallel
GEMMs after an all-gather), gate_proj (gate and up are alike), o_proj and down_proj (the
row-parallel GEMMs before a reduce-scatter / all-reduce).  A is [M, K]; B is the nn.Linear weight
[N, K] used as ``w.t()``, as in the traced graphs.  Every implementation is checked against cuBLAS
first; then ``--calls`` calls are captured in one CUDA graph and the per-call median over
``--replays`` replays is reported (µs).  Writes DIR/gemm-{gpu}-{date}.json: machine, versions,
command, and per shape the cuBLAS / pointer / per-config TMA times and the best TMA config's ratio
to cuBLAS (>= 1 means faster than cuBLAS).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tdcompile.measure import graph_us  # noqa: E402  (fn captured ``calls`` times, median of replays)

HIDDEN, INTER, Q, KV = 5120, 25600, 64 * 128, 8 * 128


def shapes(world: int) -> list[tuple[str, int, int]]:
    """(name, N, K) per rank at TP=world."""
    return [("q_proj", Q // world, HIDDEN), ("k_proj", KV // world, HIDDEN), ("gate_proj", INTER // world, HIDDEN),
            ("o_proj", HIDDEN, Q // world), ("down_proj", HIDDEN, INTER // world)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def chain_rows(args, worlds: list, M: int, L: int) -> list:
    """The chain GEMM + all-reduce's chunk GEMMs (``kernels/gemm_all_reduce_chain.py``): M/(W*L)
    rows each, added into the partial sum that arrived (cuBLAS ``addmm_`` with beta = 1) against
    the TMA GEMM with ``accumulate`` (its picked config)."""
    from tdcompile.kernels.gemm_tma import pick_tma_config, tma_gemm
    rows = []
    for W in worlds:
        m = M // (W * L)
        for name, N, K in shapes(W):
            if name not in ("o_proj", "down_proj"):
                continue
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)                 # [m, K] chunk
            b = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02).t()    # [K, N] view
            c0 = torch.randn(m, N, device="cuda", dtype=torch.bfloat16)                # partial sum in
            c = c0.clone()
            ref = torch.addmm(c0, x, b)
            cfg = pick_tma_config(m, N, K, accumulate=True)
            tma_gemm(x, b, out=c, cfg=cfg, accumulate=True)
            r = {"W": W, "name": f"{name} chain chunk (L={L})", "M": m, "N": N, "K": K, "accumulate": True,
                 "tma_picked": cfg.name(), "tma_err": rel_err(c, ref)}
            r["cublas_us"] = graph_us(lambda: c.addmm_(x, b), args.calls, args.replays)
            r["tma_picked_us"] = graph_us(lambda: tma_gemm(x, b, out=c, cfg=cfg, accumulate=True), args.calls,
                                          args.replays)
            r["tma_picked_vs_cublas"] = round(r["cublas_us"] / r["tma_picked_us"], 3)
            print(json.dumps(r), flush=True)
            rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--world", default="2,4")
    ap.add_argument("--m", default="4096,128")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--replays", type=int, default=7)
    ap.add_argument("--configs", default="", help="comma-separated config names (default: all)")
    ap.add_argument("--picked", action="store_true", help="only the config pick_tma_config picks per shape")
    ap.add_argument("--chain", default="", help="also the chain's accumulating chunk GEMMs: full M,L (e.g. 4096,2)")
    args = ap.parse_args()
    import triton
    from tdcompile.kernels.all_gather_gemm import local_gemm
    from tdcompile.kernels.gemm_tma import pick_tma_config, tma_configs, tma_gemm

    torch.manual_seed(0)
    dt = torch.bfloat16
    cfgs = [c for c in tma_configs() if not args.configs or c.name() in args.configs.split(",")]
    t_start = time.time()
    rows = []
    for W in [int(x) for x in args.world.split(",")]:
        for M in [int(x) for x in args.m.split(",")]:
            a = torch.randn(M, HIDDEN * 4, device="cuda", dtype=dt)
            for name, N, K in shapes(W):
                x = a[:, :K].contiguous()                                    # [M, K]
                w = torch.randn(N, K, device="cuda", dtype=dt) * 0.02        # nn.Linear weight [N, K]
                b = w.t()                                                    # [K, N] view
                ref = x @ b
                r = {"W": W, "name": name, "M": M, "N": N, "K": K}
                r["cublas_us"] = graph_us(lambda: x @ b, args.calls, args.replays)
                out = torch.empty_like(ref)
                r["pointer_err"] = rel_err(local_gemm(x, b), ref)
                r["pointer_us"] = graph_us(lambda: local_gemm(x, b), args.calls, args.replays)
                r["tma"] = {}
                for cfg in ([pick_tma_config(M, N, K)] if args.picked else cfgs):
                    if M <= 128 and cfg.BLOCK_SIZE_M > 64 or M > 128 and cfg.BLOCK_SIZE_M < 128:
                        continue
                    try:
                        err = rel_err(tma_gemm(x, b, out, cfg), ref)
                        us = graph_us(lambda: tma_gemm(x, b, out, cfg), args.calls, args.replays)
                        r["tma"][cfg.name()] = {"us": round(us, 2), "err": err}
                    except Exception as e:                                   # noqa: BLE001 (recorded)
                        r["tma"][cfg.name()] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                ok = {k: v["us"] for k, v in r["tma"].items() if "us" in v and v["err"] < 2e-2}
                if ok:
                    best = min(ok, key=ok.get)
                    r["tma_best"], r["tma_best_us"] = best, ok[best]
                    r["tma_best_vs_cublas"] = round(r["cublas_us"] / ok[best], 3)
                picked = pick_tma_config(M, N, K).name()
                if picked in ok:
                    r["tma_picked"], r["tma_picked_vs_cublas"] = picked, round(r["cublas_us"] / ok[picked], 3)
                r["pointer_vs_cublas"] = round(r["cublas_us"] / r["pointer_us"], 3)
                r["cublas_tflops"] = round(2 * M * N * K / r["cublas_us"] / 1e6, 1)
                print(json.dumps({k: v for k, v in r.items() if k != "tma"}), flush=True)
                rows.append(r)
    if args.chain:
        rows += chain_rows(args, [int(x) for x in args.world.split(",")], *[int(x) for x in args.chain.split(",")])
    props = torch.cuda.get_device_properties(0)
    date = datetime.datetime.now(datetime.timezone.utc)
    doc = {"kind": "gemm", "mode": "one_gpu", "date": date.isoformat(timespec="seconds"),
           "machine": {"gpu": props.name, "sms": props.multi_processor_count},
           "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
           "command": " ".join(["python3"] + sys.argv), "dtype": "bfloat16",
           "timing": f"median of {args.replays} replays of a CUDA graph of {args.calls} calls",
           "seconds": round(time.time() - t_start, 1), "results": rows}
    gpu = props.name.lower().replace("nvidia ", "").replace(" ", "-")
    path = os.path.join(args.out, f"gemm-{gpu}-{date:%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
