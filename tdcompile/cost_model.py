"""Shape-based cost model: predicted time of every candidate implementation of a match.

A pure module (no graph, no kernels). Analytic model whose constants come from a
per-machine :class:`DeviceProfile` (shipped JSON in ``tdcompile/profiles/``, or one
measured by ``tdcompile calibrate``):

* GEMM            ``launch + max(2MNK / peak, bytes / hbm)``        (roofline)
* NCCL collective ``latency + algorithm bytes / bus bandwidth``
* P2P collective  ``p2p latency + bytes over the links`` (our symmetric-memory kernels)
* fused op        the GEMM and the transfer overlap except for ``1 - overlap`` of the
                  transfer and the part that cannot start before the first data arrives.

``decide`` turns the measured table (on a GPU) or these predictions (no GPU) into a
:class:`Decision` with a human-readable reason. On a GPU the analytic model never decides:
it is fitted to the measurements by ``tdcompile calibrate``, which reports its error per op.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

PATTERNS = ("gemm_all_reduce", "all_gather_gemm", "gemm_reduce_scatter", "all_reduce", "all_reduce_rmsnorm",
            "gemm_all_reduce_rmsnorm")
_PROFILE_DIR = os.path.join(os.path.dirname(__file__), "profiles")


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    name: str
    """Profile name, e.g. ``"h200"``."""
    gemm_tflops: float
    """Achievable dense bf16/fp16 GEMM rate (cuBLAS) on large shapes, TFLOP/s."""
    hbm_gbps: float
    """Device-memory bandwidth, GB/s (bytes read + written)."""
    launch_us: float
    """Fixed cost of one kernel launch, us."""
    link_gbps: float
    """P2P bandwidth one GPU reaches to its peers per direction (NVLink), GB/s."""
    p2p_latency_us: float
    """Cost of one signalled P2P exchange in our kernels (signal round trip + launch), us."""
    nccl_latency_us: float
    """Fixed cost of one NCCL collective, us."""
    nccl_gbps: float
    """NCCL bus bandwidth (algorithm bytes per second), GB/s."""
    overlap: float = 0.8
    """Fraction of the transfer a fused kernel hides under its GEMM."""
    fused_gemm_efficiency: float = 0.92
    """Rate of our Triton GEMM relative to cuBLAS on the same shape."""
    source: str = ""
    """Where the numbers come from (machine, date, command)."""
    extra: dict = field(default_factory=dict)
    """Anything else a calibration recorded (raw measurements)."""

    @staticmethod
    def load(name_or_path: str) -> "DeviceProfile":
        path = name_or_path if os.path.exists(name_or_path) else os.path.join(_PROFILE_DIR, f"{name_or_path}.json")
        if not os.path.exists(path):
            raise ValueError(f"tdist: no device profile {name_or_path!r} (shipped: {shipped_profiles()})")
        with open(path) as f:
            return DeviceProfile(**json.load(f))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)


def shipped_profiles() -> list[str]:
    return sorted(p[:-5] for p in os.listdir(_PROFILE_DIR) if p.endswith(".json"))


def profile_for_device(device: Optional[torch.device] = None) -> Optional[DeviceProfile]:
    """The shipped profile of the current GPU (by name), or None (CPU, unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key in shipped_profiles():
        if key in name:
            return DeviceProfile.load(key)
    return None


@dataclass(frozen=True)
class Decision:
    choice: str
    """An impl of ``config.FAMILIES`` (``"unfused"``, ``"fused"``, ``"symm_mem:two_shot"``, ...) or
    ``"auto"`` (decided at run time inside the op, from the measured table)."""
    candidates_us: dict
    """Candidate impl -> microseconds (empty when nothing is known yet)."""
    reason: str
    source: str = "-"
    """Where ``candidates_us`` came from: ``"measured"`` (in this process), ``"cached"`` (user
    cache), ``"shipped"`` (the package's measured table), ``"predicted"`` (analytic model)."""

    @property
    def predicted_us(self) -> dict:  # the name reports and older callers use
        return self.candidates_us


# ------------------------------------------------------------------ primitives
def gemm_us(p: DeviceProfile, m: int, n: int, k: int, elem: int, efficiency: float = 1.0) -> float:
    flops_s = 2.0 * m * n * k / (p.gemm_tflops * 1e12 * efficiency)
    bytes_s = (m * k + k * n + m * n) * elem / (p.hbm_gbps * 1e9)
    return p.launch_us + 1e6 * max(flops_s, bytes_s)


def nccl_us(p: DeviceProfile, kind: str, nbytes: float, w: int) -> float:
    """``nbytes``: the reduced tensor (all_reduce), the gathered output (all_gather) or the
    input (reduce_scatter)."""
    factor = 2.0 * (w - 1) / w if kind == "all_reduce" else (w - 1) / w
    return p.nccl_latency_us + 1e6 * factor * nbytes / (p.nccl_gbps * 1e9)


def p2p_all_reduce_us(p: DeviceProfile, nbytes: float, w: int) -> float:
    one_shot = p.p2p_latency_us + 1e6 * ((w - 1) * nbytes / (p.link_gbps * 1e9) + w * nbytes / (p.hbm_gbps * 1e9))
    two_shot = 2 * p.p2p_latency_us + 1e6 * 2.0 * (w - 1) / w * nbytes / (p.link_gbps * 1e9)
    return min(one_shot, two_shot)


def p2p_transfer_us(p: DeviceProfile, nbytes: float, w: int) -> float:
    """All-gather / reduce-scatter traffic: each rank moves (w-1)/w of ``nbytes``."""
    return 1e6 * (w - 1) / w * nbytes / (p.link_gbps * 1e9)


# ------------------------------------------------------------------ candidates
def predict(pattern: str, *, m: int, n: int, k: int, world_size: int, elem: int,
            profile: DeviceProfile) -> dict[str, float]:
    """Predicted microseconds of each candidate. ``m`` is the full (gathered / pre-scatter)
    row count, ``n`` the summed output width for several weights, ``k`` the reduction dim."""
    p, w = profile, world_size
    if pattern == "all_reduce":
        nbytes = m * n * elem
        return {"unfused": nccl_us(p, "all_reduce", nbytes, w), "fused": p2p_all_reduce_us(p, nbytes, w)}
    if pattern == "all_reduce_rmsnorm":
        # unfused: NCCL + one fused add+norm kernel (read x, residual; write both outputs);
        # fused: the P2P all-reduce with the norm in its epilogue (writes both outputs)
        nbytes = m * n * elem
        return {"unfused": nccl_us(p, "all_reduce", nbytes, w) + p.launch_us + 4 * nbytes / (p.hbm_gbps * 1e3),
                "fused": p2p_all_reduce_us(p, nbytes, w) + 2 * nbytes / (p.hbm_gbps * 1e3)}
    gemm = gemm_us(p, m, n, k, elem)
    fused_gemm = gemm_us(p, m, n, k, elem, p.fused_gemm_efficiency)
    if pattern == "gemm_all_reduce_rmsnorm":
        # cuBLAS in both; fused: it writes the symmetric buffer the all-reduce + norm kernel reads
        norm = predict("all_reduce_rmsnorm", m=m, n=n, k=0, world_size=w, elem=elem, profile=p)
        return {c: gemm + t for c, t in norm.items()}
    if pattern == "gemm_all_reduce":
        nbytes = m * n * elem
        comm = p2p_all_reduce_us(p, nbytes, w)
        return {"unfused": gemm + nccl_us(p, "all_reduce", nbytes, w),
                "fused": fused_gemm + (1 - p.overlap) * comm + p.p2p_latency_us}
    if pattern == "all_gather_gemm":
        nbytes = m * k * elem
        xfer = p2p_transfer_us(p, nbytes, w)
        # the last shard's GEMM cannot start before its data arrived
        fused = max(fused_gemm, xfer + fused_gemm / w) + (1 - p.overlap) * xfer + p.p2p_latency_us
        return {"unfused": nccl_us(p, "all_gather", nbytes, w) + gemm, "fused": fused}
    if pattern == "gemm_reduce_scatter":
        nbytes = m * n * elem
        xfer = p2p_transfer_us(p, nbytes, w)
        fused = max(fused_gemm, fused_gemm / w + xfer) + (1 - p.overlap) * xfer + p.p2p_latency_us
        return {"unfused": gemm + nccl_us(p, "reduce_scatter", nbytes, w), "fused": fused}
    raise ValueError(f"unknown pattern {pattern!r}")


def decide(pattern: str, *, m: Optional[int], n: int, k: int, world_size: int, dtype: torch.dtype,
           strategy: str, profile: Optional[DeviceProfile], table=None) -> Decision:
    """Pick an implementation for one match. ``m=None`` means dynamic (unknown at compile time).

    ``table`` (a :class:`tdcompile.measured.Table`, given on a GPU) makes ``"auto"`` decide from
    measurements only -- a static M from its entry (a miss stays unfused: the pipeline measures
    such keys before asking, ``backend.decide_measured``), a dynamic M at run time (``"auto"``);
    without it (no GPU) the analytic model predicts from ``profile``."""
    from tdcompile import measured
    from tdcompile.config import FAMILIES

    if strategy in FAMILIES or strategy == "sequence_parallel":
        impl = "fused" if strategy == "sequence_parallel" else strategy
        return Decision(impl, {}, f"strategy={strategy!r} forces {impl!r} on every match")
    if table is not None:
        if m is None:
            return Decision("auto", {}, "dynamic M: the op picks from the measured table per M bucket at run time")
        key = measured.Key.of(pattern, m=m, n=n, k=k, dtype=dtype, world=world_size)
        hit = table.lookup(key)
        if hit is None:   # the pipeline measures such a key while compiling (backend.decide_measured)
            return Decision("unfused", {}, f"not in the measured table ({key.id()}): keeping unfused; a compile "
                                           "on the GPU measures it first, all ranks together")
        choice, why = measured.choose(hit[0], key.m)
        return Decision(choice, {c: round(t, 1) for c, t in hit[0].items()}, why, source=hit[1])
    if profile is None or m is None:
        return Decision("unfused", {}, "no GPU and no device profile: keeping NCCL/gloo + GEMM" if profile is None
                        else "no GPU and dynamic M: keeping NCCL/gloo + GEMM")
    elem = torch.empty((), dtype=dtype).element_size()
    pred = {c: round(t, 2) for c, t in predict(pattern, m=m, n=n, k=k, world_size=world_size, elem=elem,
                                                profile=profile).items()}
    choice, why = measured.choose(pred, measured.bucket(m))
    return Decision(choice, pred, f"predicted (no GPU to measure on): {why}", source="predicted")
