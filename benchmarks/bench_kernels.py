"""Kernel benchmark: fused tdist ops vs unfused (collective + cuBLAS) vs torch symm_mem ops
vs the local GEMM alone, at Qwen3-32B TP=2 shapes (hidden 5120, intermediate 25600).

Real ranks (>= 2 GPUs):   torchrun --nproc-per-node 2 benchmarks/bench_kernels.py
Simulated ranks (1 GPU):  python benchmarks/bench_kernels.py --sim 2
  SIMULATED: all ranks share ONE GPU's SMs and HBM, peers are buffers on the same GPU,
  so the numbers measure kernel + protocol overhead, NOT 2-GPU communication times.

Times are medians (us) of CUDA-graph replays (each graph holds ``--inner`` calls).
Writes benchmarks/results/kernels-<mode>-<gpu>-<date>.json (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys

from tdcompile.launch import SAFE_ENV  # noqa: E402

os.environ.update(SAFE_ENV)            # NVLink multicast stays off (forced, before any process group)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HIDDEN, INTER, TP = 5120, 25600, 2


def timed(fn, reps=20, inner=5):
    """Median microseconds per call of ``fn`` (graph-captured; eager if capture fails)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=s):
                for _ in range(inner):
                    fn()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        print(f"  (graph capture failed: {type(e).__name__}: {e}; timing eagerly)", flush=True)
        g = None
    times = []
    for _ in range(reps):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        if g is not None:
            g.replay()
        else:
            for _ in range(inner):
                fn()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) * 1000 / inner)
    return statistics.median(times)


def shapes(ms):
    # (op, M, N, K, note): per-rank TP=2 shards
    out = []
    for M in ms:
        out.append(("all_reduce", M, HIDDEN, 0, "x[M,5120]"))
        out.append(("gemm_all_reduce", M, HIDDEN, INTER // TP, "down_proj: [M,12800]@[12800,5120] + AR"))
        out.append(("all_gather_gemm", M, INTER // TP, HIDDEN, "AG [M/2,5120] -> gate,up [5120,12800] x2"))
        out.append(("gemm_reduce_scatter", M, HIDDEN, INTER // TP, "down_proj: [M,12800]@[12800,5120] + RS"))
    return out


def bench_sim(W, ms, reps, inner):
    from tdcompile.kernels.all_gather_gemm import all_gather_gemm, local_gemm
    from tdcompile.kernels.all_reduce import all_reduce
    from tdcompile.kernels.gemm_all_reduce import gemm_all_reduce
    from tdcompile.kernels.gemm_reduce_scatter import gemm_reduce_scatter
    from tdcompile.kernels.symm import SimWorld
    os.environ.setdefault("TDCOMPILE_MAX_M", str(max(ms)))
    sim = SimWorld(W)
    dt = torch.bfloat16
    rows = []
    for op, M, N, K, note in shapes(ms):
        r = {"op": op, "M": M, "N": N, "K": K, "note": note}
        if op == "all_reduce":
            xs = [torch.randn(M, N, device="cuda", dtype=dt) for _ in range(W)]
            r["fused_sim_us"] = timed(lambda: sim.run(lambda ws, x: all_reduce(ws, x), [(x,) for x in xs]), reps, inner)
            r["copy_only_sim_us"] = timed(lambda: sim.run(lambda ws, x: x.clone(), [(x,) for x in xs]), reps, inner)
        elif op in ("gemm_all_reduce", "gemm_reduce_scatter"):
            a = [torch.randn(M, K, device="cuda", dtype=dt) for _ in range(W)]
            b = [(torch.randn(N, K, device="cuda", dtype=dt) * 0.02).t() for _ in range(W)]   # nn.Linear layout
            fn = gemm_all_reduce if op == "gemm_all_reduce" else gemm_reduce_scatter
            r["fused_sim_us"] = timed(lambda: sim.run(lambda ws, x, y: fn(ws, x, y), list(zip(a, b))), reps, inner)
            r["local_cublas_sim_us"] = timed(lambda: sim.run(lambda ws, x, y: x @ y, list(zip(a, b))), reps, inner)
            r["local_triton_sim_us"] = timed(
                lambda: sim.run(lambda ws, x, y: local_gemm(x, y, 132 // W), list(zip(a, b))), reps, inner)
            r["local_cublas_1rank_us"] = timed(lambda: a[0] @ b[0], reps, inner)
        else:
            m = M // W
            sh = [torch.randn(m, K, device="cuda", dtype=dt) for _ in range(W)]
            bs = [(torch.randn(N, K, device="cuda", dtype=dt) * 0.02).t() for _ in range(2)]
            A = torch.cat(sh)
            r["fused_sim_us"] = timed(lambda: sim.run(lambda ws, s: all_gather_gemm(ws, s, bs), [(s,) for s in sh]),
                                      reps, inner)
            r["local_cublas_sim_us"] = timed(lambda: sim.run(lambda ws, s: [A @ b for b in bs], [(s,) for s in sh]),
                                             reps, inner)
            r["local_triton_sim_us"] = timed(
                lambda: sim.run(lambda ws, s: [local_gemm(A, b, 132 // W) for b in bs], [(s,) for s in sh]), reps, inner)
            r["local_cublas_1rank_us"] = timed(lambda: [A @ b for b in bs], reps, inner)
        sim.check()
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def bench_real(ms, reps, inner):
    import torch.distributed as dist
    import tdcompile.ops  # noqa: F401
    import tdcompile.ops.cuda  # noqa: F401
    from tdcompile.kernels.all_gather_gemm import local_gemm
    rank, W = dist.get_rank(), dist.get_world_size()
    gname = dist.group.WORLD.group_name
    os.environ.setdefault("TDCOMPILE_MAX_M", str(max(ms)))
    td = torch.ops.tdist
    dt = torch.bfloat16
    rows = []
    symm_ok = True
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except Exception:  # noqa: BLE001
        symm_ok = False
    for op, M, N, K, note in shapes(ms):
        r = {"op": op, "M": M, "N": N, "K": K, "note": note}
        torch.manual_seed(rank)
        if op == "all_reduce":
            x = torch.randn(M, N, device="cuda", dtype=dt)
            for impl in ("fused", "unfused"):
                r[f"{impl}_us"] = timed(lambda: td.all_reduce(x, gname, impl), reps, inner)
            if symm_ok:
                try:
                    buf = symm_mem.empty(M * N, dtype=dt, device="cuda")
                    symm_mem.rendezvous(buf, gname)
                    r["torch_symm_two_shot_us"] = timed(
                        lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", gname), reps, inner)
                except Exception as e:  # noqa: BLE001
                    r["torch_symm_two_shot_us"] = f"failed: {type(e).__name__}: {e}"[:200]
        elif op in ("gemm_all_reduce", "gemm_reduce_scatter"):
            a = torch.randn(M, K, device="cuda", dtype=dt)
            b = (torch.randn(N, K, device="cuda", dtype=dt) * 0.02).t()
            for impl in ("fused", "unfused"):
                if op == "gemm_all_reduce":
                    r[f"{impl}_us"] = timed(lambda: td.gemm_all_reduce(a, b, None, gname, impl), reps, inner)
                else:
                    r[f"{impl}_us"] = timed(lambda: td.gemm_reduce_scatter(a, b, None, W, gname, impl), reps, inner)
            if op == "gemm_reduce_scatter" and symm_ok:
                try:
                    r["torch_symm_fused_mm_rs_us"] = timed(
                        lambda: torch.ops.symm_mem.fused_matmul_reduce_scatter(a, b, "sum", 0, gname), reps, inner)
                except Exception as e:  # noqa: BLE001
                    r["torch_symm_fused_mm_rs_us"] = f"failed: {type(e).__name__}: {e}"[:200]
            r["local_cublas_us"] = timed(lambda: a @ b, reps, inner)
            r["local_triton_us"] = timed(lambda: local_gemm(a, b), reps, inner)
        else:
            sh = torch.randn(M // W, K, device="cuda", dtype=dt)
            bs = [(torch.randn(N, K, device="cuda", dtype=dt) * 0.02).t() for _ in range(2)]
            A = torch.randn(M, K, device="cuda", dtype=dt)
            for impl in ("fused", "unfused"):
                r[f"{impl}_us"] = timed(lambda: td.all_gather_gemm(sh, bs, W, gname, False, impl), reps, inner)
            if symm_ok:
                try:
                    r["torch_symm_fused_ag_mm_us"] = timed(
                        lambda: torch.ops.symm_mem.fused_all_gather_matmul(sh, bs, 0, gname), reps, inner)
                except Exception as e:  # noqa: BLE001
                    r["torch_symm_fused_ag_mm_us"] = f"failed: {type(e).__name__}: {e}"[:200]
            r["local_cublas_us"] = timed(lambda: [A @ b for b in bs], reps, inner)
            r["local_triton_us"] = timed(lambda: [local_gemm(A, b) for b in bs], reps, inner)
        from tdcompile.ops.cuda import check_errors
        check_errors()
        dist.barrier()
        if rank == 0:
            print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def versions():
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version
        v["nvshmem4py"] = version("nvshmem4py-cu13")
    except Exception:  # noqa: BLE001
        v["nvshmem4py"] = None
    return v


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sim", type=int, default=0, help="simulate W ranks on one GPU")
    p.add_argument("--m", type=int, nargs="*", default=[128, 1024, 4096, 16384])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    real = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not args.sim
    if real:
        import torch.distributed as dist
        lr = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(lr)
        dist.init_process_group("nccl", device_id=torch.device("cuda", lr))
        rows = bench_real(args.m, args.reps, args.inner)
        mode, W = "real", dist.get_world_size()
        is_main = dist.get_rank() == 0
    else:
        W = args.sim or 2
        rows = bench_sim(W, args.m, args.reps, args.inner)
        mode, is_main = "simulated", True
    if is_main:
        gpu = torch.cuda.get_device_name()
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        res = {
            "mode": mode, "world": W,
            "note": ("SIMULATED ranks: all ranks share one GPU's SMs and HBM; peers are local buffers, so these are "
                     "kernel+protocol overheads, not multi-GPU communication times" if mode == "simulated" else
                     "real processes, one GPU each"),
            "machine": {"host": socket.gethostname(), "gpu": gpu, "gpu_count": torch.cuda.device_count(),
                        "sms": torch.cuda.get_device_properties(0).multi_processor_count},
            "date": date, "versions": versions(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                   "NVSHMEM_DISABLE_NVLS", "TDCOMPILE_MAX_M", "TDCOMPILE_SYMM_BACKEND")},
            "timing": f"median over {args.reps} CUDA-graph replays of {args.inner} calls, microseconds per call",
            "results": rows,
        }
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"kernels-{mode}{W}-{gpu.replace(' ', '_')}-{date[:10]}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", out)
        try:
            from tabulate import tabulate
            keys = sorted({k for r in rows for k in r if k.endswith("_us")})
            print(tabulate([[r["op"], r["M"]] + [r.get(k, "") if not isinstance(r.get(k), float) else round(r[k], 1)
                                                  for k in keys] for r in rows], headers=["op", "M"] + keys))
        except ImportError:
            pass
    if real:
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
