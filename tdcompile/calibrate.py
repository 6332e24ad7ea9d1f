"""Measure a cost-model device profile on the GPUs of this machine (``tdcompile calibrate``).

Measures, in a minute or two: the cuBLAS bf16 GEMM rate on large shapes, HBM bandwidth,
launch overhead, and -- when the process group spans >= 2 GPUs -- NCCL all_reduce latency
and bus bandwidth and the P2P link bandwidth (copy of a peer's symmetric buffer). Whatever
cannot be measured here (one GPU: every communication constant) is kept from the base
profile and listed under ``extra["not_measured"]``.
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
    p.add_argument("--out", default="tdist_profile.json", help="where to save the measured profile")


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
    device = torch.device("cuda", torch.cuda.current_device())
    base_name = args.base or (profile_for_device().name if profile_for_device() else "h200")
    base = DeviceProfile.load(base_name)
    local = measure_local(device)
    multi = dist.is_initialized() and dist.get_world_size() > 1
    comm = measure_comm(device) if multi else {}
    fields = {f.name for f in dataclasses.fields(DeviceProfile)}
    measured = {k: round(v, 2) for k, v in {**local, **comm}.items() if k in fields}
    not_measured = sorted(f for f in ("link_gbps", "p2p_latency_us", "nccl_latency_us", "nccl_gbps", "overlap",
                                      "fused_gemm_efficiency") if f not in measured)
    prof = dataclasses.replace(
        base, **measured, name=f"{base.name}-calibrated",
        source=f"tdcompile calibrate on {torch.cuda.get_device_name(device)} x{dist.get_world_size() if multi else 1}, "
               f"{datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}; base {base.name}",
        extra={"measured": {**local, **comm}, "not_measured": not_measured})
    if not dist.is_initialized() or dist.get_rank() == 0:
        prof.save(args.out)
        print(f"saved {args.out}: {measured}; kept from {base.name}: {not_measured}")
