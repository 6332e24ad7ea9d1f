"""The measured table: what ``strategy="auto"`` decides from on a GPU.

One entry per (op, N, K, dtype, world size, M bucket): the median microseconds of every
candidate implementation (``config.FAMILIES``, with variants), timed on all ranks together
under CUDA graphs, max over ranks (``tdcompile/measure.py``). A candidate that failed its
correctness check or could not run is recorded as ``inf``.

Where tables live (first hit wins; every file is keyed by GPU name, world size and the
torch / triton / tdcompile versions, so a table is never used on another software stack)::

    in-process     every entry measured or agreed in this process
    user cache     $TDCOMPILE_CACHE_DIR (default ~/.cache/tdcompile)/<env>.json
                   written by ``tdcompile calibrate`` and by first-call measurements (rank 0)
    shipped        tdcompile/profiles/measured/<env>.json (the measured H100 / H200 tables)

**Stale entries.** Every newly measured candidate time is stored with a digest of the source
files that implement it (``impl_digest``); an entry whose recorded digest differs from the
code now installed is treated as missing and measured again (entries written before digests
existed carry none and are kept).

Decisions are agreed: at run time every rank max-reduces the candidate times of a key over
the group before choosing (``agreed_times``), so all ranks pick the same implementation
even if their cache files differ. Dynamic M uses the same table through ``bucket(M)``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger("tdcompile")
TIE = 0.15
"""A candidate must beat ``unfused`` by more than this fraction of the op's time to be chosen.

Not 2%: on 2xH200 (2026-11-27, ``benchmarks/results/bench-h200-tp2-*``) the fused all-reduces
that won by 5-13% in this table at M=4096 gave the un-graphed E2E prefill 32x128 1.017x and
then 0.983x Inductor in two runs, and two identical graphs measured 1.018x apart: end to end,
such wins are inside the noise and may be losses. Wins of 22-45% (M=128, decode) held end to
end (1.05-1.45x, graphed). Until a smaller win is shown above the noise, it is not taken.
Rows up to ``SMALL_M`` use ``TIE_SMALL`` instead (``tie``)."""
SMALL_M = 512
"""Largest M bucket measured as decode-sized (graphed, launch- and latency-bound)."""
TIE_SMALL = 0.08
"""The margin at M <= ``SMALL_M``.  There the table's wins carried end to end: on 2xH200 the
down_proj ``gemm_all_reduce`` at M=128 chosen at 0.82x unfused gave MLP M=128 1.062x and E2E
decode 1.051x (bench-h200-tp2-20261127-102409); re-measured at 0.865x on another host it fell
inside the 15% margin, was left unfused, and MLP M=128 read 1.008x (bench-h200-tp2-20261127-114743).
The same key measured 4% apart on the two hosts; 8% is twice that."""


TIE_GRAPHED = 0.10
"""The margin at M > ``SMALL_M`` when the graph runs under CUDA graphs (no host time, no launch
gaps: the table's device time is what runs).  On 2xH100 the down_proj ``gemm_all_reduce`` at
M=4096 measured 0.864x unfused (``fused:chain2``), inside ``TIE``: MLP M=4096 read 1.000x with
15% and **1.046x** with 10%, in the same run (``bench-h100-80gb-hbm3-tp2-20261128-003213``, column
``tdist:margin10``); on 2xH200 a graphed MLP read 1.010x with 8% against 0.998x with 15%
(``bench-h200-tp2-20261127-232533``).  Un-graphed rows keep ``TIE``: there the 8% margin read
1.034x against 1.053x.  10% is 2.5x the 4% that one key measured apart on two hosts."""


def tie(m: Optional[int], graphed: bool = False) -> float:
    """The margin a candidate must beat unfused by at M bucket ``m`` (``TIE`` when unknown);
    ``graphed``: the graph runs under CUDA graphs (``TIE_GRAPHED`` above ``SMALL_M``)."""
    if m is not None and m <= SMALL_M:
        return TIE_SMALL
    return TIE_GRAPHED if graphed else TIE
_SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "profiles", "measured")


_PKG = os.path.dirname(os.path.abspath(__file__))
_DIGESTS: dict[tuple, str] = {}


def impl_files(op: str, impl: str) -> list[str]:
    """The package files (relative paths) whose code decides how fast ``impl`` runs ``op``."""
    if impl.startswith(HOST):          # host time: the op's dispatch, Python launch path and replays decide it too
        return sorted(set(impl_files(op, impl[len(HOST):]) + ["ops/cuda.py", "ops/library.py", "ops/op_graphs.py"]))
    fam, var = impl.split(":", 1)[0], (impl.split(":", 1)[1] if ":" in impl else "")
    rms = op in ("all_reduce_rmsnorm", "gemm_all_reduce_rmsnorm")
    if fam == "unfused":                   # NCCL + cuBLAS: covered by the torch version in the env,
        return ["kernels/add_rmsnorm.py", "kernels/all_reduce_rmsnorm.py"] \
            if rms else []                                 # + the stand-in for Inductor's norm kernel
    if fam == "symm_mem":
        return ["ops/symm_mem.py"]
    base = ["ops/cuda.py", "kernels/symm.py", "kernels/signals.py"]
    if op == "gemm_all_reduce":
        base.append("ops/gemm_all_reduce.py")          # the variant dispatch of that op
    if var == "lamport":
        extra = ["kernels/all_reduce_rmsnorm_lamport.py", "kernels/all_reduce_rmsnorm.py"] \
            if op == "all_reduce_rmsnorm" else []
        return base + ["kernels/all_reduce_lamport.py"] + extra
    if var == "lamport2":
        extra = ["kernels/all_reduce_rmsnorm_lamport2.py", "kernels/all_reduce_rmsnorm.py"] \
            if op == "all_reduce_rmsnorm" else []
        return base + ["kernels/all_reduce_lamport.py", "kernels/all_reduce_lamport2.py"] + extra
    if var.startswith("pipe"):
        return base + ["ops/overlap.py", "kernels/all_reduce.py"]
    if var.startswith("ce") and op == "gemm_reduce_scatter":
        return base + ["kernels/gemm_reduce_scatter_ce.py", "kernels/gemm_all_reduce_ce.py", "kernels/all_gather_gemm.py",
                       "kernels/tiles.py"]
    if var.startswith("ce") and op == "all_gather_gemm":
        return base + ["kernels/all_gather_gemm_ce.py", "kernels/all_gather_gemm.py", "kernels/tiles.py"]
    if var.startswith("ce"):
        return base + ["ops/overlap.py", "kernels/gemm_all_reduce_ce.py"]
    if var.startswith("chain"):
        return base + ["ops/overlap.py", "kernels/gemm_all_reduce_chain.py"]
    if var in ("one_shot", "two_shot"):
        extra = ["kernels/all_reduce_rmsnorm.py"] if rms else []
        return base + ["kernels/all_reduce.py"] + extra
    return base + [f"kernels/{op}.py", "kernels/tiles.py"]


def impl_digest(op: str, impl: str) -> str:
    """12 hex digits over the files of ``impl_files`` ("" for unfused); cached per process."""
    if (op, impl) not in _DIGESTS:
        import hashlib
        h = hashlib.sha256(b"op_graphs=0" if impl.startswith(HOST) and os.environ.get("TDCOMPILE_OP_GRAPHS") == "0" else b"")
        for rel in impl_files(op, impl):
            try:
                with open(os.path.join(_PKG, rel), "rb") as f:
                    h.update(rel.encode() + b"\0" + f.read())
            except OSError:
                h.update(rel.encode() + b"\0missing")
        _DIGESTS[(op, impl)] = h.hexdigest()[:12] if impl_files(op, impl) else ""
    return _DIGESTS[(op, impl)]


def bucket(m: int) -> int:
    """The M bucket of ``m`` rows: the next power of two (1, 2, 4, ... ) -- M is measured there."""
    return 1 << max(0, math.ceil(math.log2(max(1, int(m)))))


@dataclass(frozen=True)
class Key:
    op: str
    """A pattern / ``tdist`` op name, e.g. ``"gemm_all_reduce"``."""
    n: int
    """Output width (summed over the weights of an all_gather_gemm)."""
    k: int
    """Reduction dim of the GEMM (0 for all_reduce)."""
    dtype: str
    """``"bfloat16"``, ``"float16"``, ``"float32"``."""
    world: int
    """Ranks of the group."""
    m: int
    """M bucket (rows of the full, gathered / pre-scatter matrix)."""

    @staticmethod
    def of(op: str, *, m: int, n: int, k: int, dtype, world: int) -> "Key":
        return Key(op, int(n), int(k), str(dtype).replace("torch.", ""), int(world), bucket(m))

    def id(self) -> str:
        return f"{self.op}|n={self.n}|k={self.k}|{self.dtype}|w={self.world}|m={self.m}"

    @staticmethod
    def parse(s: str) -> "Key":
        op, n, k, dtype, w, m = s.split("|")
        return Key(op, int(n[2:]), int(k[2:]), dtype, int(w[2:]), int(m[2:]))


HOST = "host:"
"""Prefix of a table entry that holds a candidate's host time per call, ``"host:<impl>"``: the
microseconds of Python and launches it takes un-graphed (``measure.host_us``). An op whose host
time exceeds the device time it saves loses in an un-graphed graph: on 4xH200 (2026-11-27,
``bench-h200-tp4-20261127-153912`` / ``-154427``) the sequence-parallel form, 0.85-0.92x in
device time, made the un-graphed E2E prefill 0.59-0.82x; its AG-GEMM / GEMM-RS calls take
800-1000 us of host time each (``calibrate-h200-tp4-20261127-1553-host.json``)."""


def device_times(times: dict) -> dict:
    """``times`` without the ``HOST`` entries."""
    return {c: t for c, t in times.items() if not c.startswith(HOST)}


def effective(times: dict, charge_host: bool = True) -> dict:
    """``{impl: us}`` a decision compares: the device time, or (``charge_host``: the graph is not
    replayed in a CUDA graph) the larger of the device and the host time per call -- a call
    cannot end before it is issued, so an un-graphed op costs at least its host time.
    ``unfused`` stays at its device time: choosing it leaves Inductor's own code in the graph,
    whose host cost is lower than the ``tdist`` op's unfused path that ``host:unfused`` times
    (122 us per all-reduce call on 2xH200; Inductor issues the same NCCL call from its wrapper).
    Candidates without a host entry (or a failed one): device time only.

    Not additive: device + the host time beyond unfused's would be right for a graph whose CPU is
    always the bottleneck, and dropped the GEMM + all-reduce + RMSNorm op that gained un-graphed
    E2E prefill 3-5% at TP=2 (host 230 us, device 360 us vs 437 unfused)."""
    dev = device_times(times)
    if not charge_host:
        return dev
    out = {}
    for c, t in dev.items():
        h = times.get(HOST + c)
        out[c] = max(t, h) if c != "unfused" and h is not None and math.isfinite(h) else t
    return out


def choose(times: dict, m: Optional[int] = None, margin: Optional[float] = None,
           charge_host: bool = True) -> tuple[str, str]:
    """(impl, why) from ``{impl: us}`` (``HOST`` entries included): the fastest by ``effective``
    time, unless it beats unfused by <= ``margin`` (None: ``tie(m, graphed)``; ``m``: the key's M
    bucket; None = unknown, the large-M margin). ``charge_host=False``: under CUDA graphs (host
    times not charged, and the graphed margin)."""
    margin = tie(m, graphed=not charge_host) if margin is None else margin
    ok = {c: t for c, t in effective(times, charge_host).items() if t is not None and math.isfinite(t)}
    if "unfused" not in ok:
        return "unfused", "unfused was not measured: keeping it"
    best = min(ok, key=ok.get)
    if best == "unfused":
        return "unfused", "unfused is fastest"
    if ok[best] < ok["unfused"] * (1 - margin):
        return best, f"{best} {ok['unfused'] / ok[best]:.2f}x faster than unfused"
    return "unfused", f"{best} within {margin:.0%} of unfused: tie goes to unfused"


# ------------------------------------------------------------------ environment + files
def environment(world: int, device=None) -> dict:
    """What a table is keyed by."""
    import tdcompile
    env = {"gpu": torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cpu",
           "world": int(world), "torch": torch.__version__.split("+")[0], "tdcompile": tdcompile.__version__}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    return env


def env_slug(env: dict) -> str:
    gpu = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower().replace("nvidia", "")).strip("-")
    return f"{gpu}-w{env['world']}-torch{env['torch']}-triton{env['triton']}-tdc{env['tdcompile']}"


def cache_dir() -> str:
    return os.environ.get("TDCOMPILE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "tdcompile"))


class Table:
    """Entries of one environment: ``{Key.id(): {impl: us}}`` plus where each came from."""

    def __init__(self, env: dict):
        self.env = env
        self.entries: dict[str, dict[str, float]] = {}
        self.source: dict[str, str] = {}
        self.digests: dict[str, dict[str, str]] = {}     # key id -> {impl: impl_digest at measurement}
        for where, d in (("shipped", _SHIPPED_DIR), ("cached", cache_dir())):   # cache overrides shipped
            self._load(os.path.join(d, env_slug(env) + ".json"), where)

    def _load(self, path: str, where: str) -> None:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return
        if {k: data.get("env", {}).get(k) for k in self.env} != self.env:
            log.warning("tdist: ignoring measured table %s: made for %s, this is %s", path, data.get("env"), self.env)
            return
        for kid, times in data.get("entries", {}).items():
            self.entries[kid] = {c: float(t) for c, t in times.items()}
            self.source[kid] = where
            self.digests[kid] = dict(data.get("digests", {}).get(kid, {}))

    def stale(self, key: Key) -> list[str]:
        """Candidates of ``key``'s entry measured with code other than what is installed now."""
        kid = key.id()
        return sorted(c for c, d in self.digests.get(kid, {}).items() if d != impl_digest(key.op, c))

    def lookup(self, key: Key, partial: bool = False) -> Optional[tuple[dict, str]]:
        """``(times, source)``, or None if the key is missing or any candidate's code changed;
        with ``partial``, the candidates whose code did not change (the stale ones are left out,
        to be measured again), None only if the key is missing."""
        kid = key.id()
        if kid not in self.entries:
            return None
        bad = self.stale(key)
        if bad and not partial:
            log.info("tdist: measured entry %s is stale for %s (code changed): measuring again", kid, bad)
            return None
        return {c: t for c, t in self.entries[kid].items() if c not in bad}, self.source[kid]

    def record(self, key: Key, times: dict, source: str = "measured") -> None:
        self.entries[key.id()] = dict(times)
        self.source[key.id()] = source
        self.digests[key.id()] = {c: impl_digest(key.op, c) for c in times}

    def save(self, path: Optional[str] = None, meta: Optional[dict] = None) -> str:
        """Merge this table's entries into the user cache file (or ``path``)."""
        path = path or os.path.join(cache_dir(), env_slug(self.env) + ".json")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        old, old_digests = {}, {}
        try:
            with open(path) as f:
                prev = json.load(f)
            old, old_digests = prev.get("entries", {}), prev.get("digests", {})
        except (OSError, ValueError):
            pass
        entries = {**old, **self.entries}
        digests = {**old_digests, **{k: d for k, d in self.digests.items() if d}}
        data = {"env": self.env, **(meta or {}),
                "entries": {k: {c: (round(t, 2) if math.isfinite(t) else "inf") for c, t in v.items()}
                            for k, v in sorted(entries.items())},
                "digests": {k: digests[k] for k in sorted(digests) if k in entries}}
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
        return path


_TABLES: dict[int, Table] = {}
_LOCK = threading.Lock()


def table(world: int) -> Table:
    """The process-wide table of this GPU for groups of ``world`` ranks."""
    with _LOCK:
        if world not in _TABLES:
            _TABLES[world] = Table(environment(world))
        return _TABLES[world]


def reset() -> None:
    """Forget loaded tables (tests; after ``calibrate`` wrote a new cache file)."""
    with _LOCK:
        _TABLES.clear()
        _AGREED.clear()


# ------------------------------------------------------------------ agreement
def _group(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name)


def _comm_device(pg) -> torch.device:
    import torch.distributed as dist
    backend = dist.get_backend(pg)
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")


def _all_reduce(t: torch.Tensor, op, pg) -> None:
    """``dist.all_reduce`` with torch's Python dispatcher off.  Inductor runs our pass -- and so the
    agreement collectives of ``auto`` -- with it on; then the collective's C++ call holds the GIL
    while it waits for the process group's work queue, whose worker thread needs the GIL to free
    the previous call's tensors: a deadlock (a gloo rank hung in ``max_over_ranks`` while
    compiling, CI 2026-11-27; the storm test in ``tests/test_compile_time_measure.py``)."""
    import torch.distributed as dist
    from torch._dispatch.python import no_python_dispatcher
    with no_python_dispatcher():
        dist.all_reduce(t, op=op, group=pg)


def all_agree(ok: bool, group_name: str) -> bool:
    """True on every rank iff ``ok`` is true on every rank of the group (a collective)."""
    import torch.distributed as dist
    pg = _group(group_name)
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_comm_device(pg))
    _all_reduce(t, dist.ReduceOp.MIN, pg)
    return bool(t.item())


def max_over_ranks(times: dict, names: list, group_name: str) -> dict:
    """``{name: max over ranks of times[name]}`` (missing = inf); a collective."""
    import torch.distributed as dist
    pg = _group(group_name)
    t = torch.tensor([float(times.get(c, math.inf)) for c in names], dtype=torch.float64, device=_comm_device(pg))
    _all_reduce(t, dist.ReduceOp.MAX, pg)
    return dict(zip(names, t.tolist()))


_AGREED: dict[tuple, tuple[str, dict, str]] = {}


def _record_and_save(tab: "Table", key: Key, times: dict, source: str, group_name: str) -> None:
    """Record ``times`` as ``key``'s entry; rank 0 merges it into the user cache file."""
    tab.record(key, times, source)
    import torch.distributed as dist
    if dist.get_rank(_group(group_name)) == 0:
        try:
            path = tab.save()
            log.info("tdist: measured %s -> %s (saved to %s)", key.id(), times, path)
        except OSError as e:
            log.warning("tdist: could not save the measured table: %s", e)


def agreed_times(key: Key, group_name: str, candidates: list, measure_fn, fresh: bool = False) \
        -> tuple[Optional[dict], str]:
    """Candidate times of ``key`` every rank agrees on (collective on first use of a key):
    the table's entry if every rank has one with every candidate; if every rank has the entry
    but some candidates are new (a kernel joined ``auto`` after the table was shipped) or were
    measured with code that has changed since (stale), only those are measured
    (``measure_fn(missing)``) and merged in; else (or with ``fresh``) a new measurement of every
    candidate, ``measure_fn()``.  What was measured is recorded in the table and the user cache.

    ``measure_fn=None``: look up only -- ``(None, "")`` on every rank when some rank would have to
    measure (nothing is recorded)."""
    ck = (key, group_name)
    if ck in _AGREED and not fresh:
        return _AGREED[ck][1], _AGREED[ck][2]
    tab = table(key.world)
    hit = None if fresh else tab.lookup(key, partial=True)
    have = {c: 0.0 for c in (hit[0] if hit is not None else {})}
    agreed_have = max_over_ranks(have, candidates, group_name)          # inf: missing on some rank
    missing = [c for c in candidates if not math.isfinite(agreed_have[c])]
    if missing and measure_fn is None:
        return None, ""
    if "unfused" not in missing:          # every rank has the entry (a rank without one misses all)
        known = [c for c in candidates if c not in missing]
        times, source = max_over_ranks(hit[0], known, group_name), hit[1]
        if missing:
            new = max_over_ranks(measure_fn(missing), missing, group_name)
            times = {c: (times[c] if c in times else new[c]) for c in candidates}
            source = "measured"
            _record_and_save(tab, key, {**hit[0], **new}, source, group_name)
    else:
        times, source = max_over_ranks(measure_fn(), candidates, group_name), "measured"
        if math.isfinite(times.get("unfused", math.inf)):   # not a measurement that failed as a whole
            _record_and_save(tab, key, times, source, group_name)
    _AGREED[ck] = (choose(times, key.m)[0], times, source)
    return times, source
