"""GEMM -> all-reduce, pipelined over row chunks on two streams (the ``fused:pipe*`` variants).

``gemm_all_reduce`` at prefill sizes spends 15-40% of its time in the all-reduce, which an
unfused graph runs after the whole GEMM.  Split the M rows into ``chunks`` pieces: the GEMM of
chunk i (cuBLAS, main stream) runs while chunk i-1 is all-reduced on a side stream, so only
the last chunk's all-reduce is exposed::

    main:  mm[0] ─ mm[1] ─ mm[2] ─ mm[3] ─────────── join
    side:        ╰ ar[0] ╰ ar[1] ╰ ar[2] ╰ ar[3] ─╯

Each ``mm[i]`` writes rows ``[lo, hi)`` of the output in place (``out=`` view: no copy) and
records an event; the side stream waits for it and all-reduces those rows in place.  Two
reducers (the variant's suffix):

* ``pipe<C>``       -- tdcompile's two-shot all-reduce kernel (``kernels.all_reduce``) on
  ``PIPE_CTAS`` CTAs, leaving the other SMs to the GEMM;
* ``pipe<C>_nccl``  -- NCCL (``dist.all_reduce`` on the side stream).

Measured on 2xH200 / 4xH200 neither overlaps (both compete with cuBLAS for SMs):
``benchmarks/NOTES-prefill-overlap.md``.  ``ce<C>`` uses the same row chunks but moves the
bytes on the copy engine (``kernels/gemm_all_reduce_ce.py``).

**Stream safety.**  The side stream first waits for the main stream (the inputs and every
earlier collective are done) and the main stream waits for the side stream before the op
returns, so nothing after the op sees a partial result and the side stream's all-reduces run
one at a time (the all-reduce kernel's symmetric input area and flag counters are shared by
every call: serial use keeps their invariants).  ``out`` is allocated on the main stream and
used on the side stream only before the join, so the caching allocator never hands it out
while the side stream still writes it.  All of it is CUDA-graph capturable (events and
stream waits become graph edges).

Whether any of this beats the unfused sequence is decided by measurement
(``measure.CANDIDATES``): the variants are candidates of ``auto``, never defaults.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch

PIPE_CTAS = 32
"""CTAs of the tdcompile all-reduce kernel while a GEMM runs beside it."""
MIN_CHUNK_ROWS = 256
"""Fewer rows per chunk than this and a GEMM chunk is too small to hide anything: not run."""
ROW_ALIGN = 128
"""Chunk boundaries fall on multiples of this many rows (cuBLAS tile friendly)."""
VARIANT = re.compile(r"pipe(\d+)(_nccl)?$")
CE_VARIANT = re.compile(r"ce(\d+)(?:s(\d+))?$")
CHAIN_VARIANT = re.compile(r"chain(\d+)$")


def parse(variant: str) -> Optional[tuple[int, str]]:
    """``"pipe4_nccl"`` -> ``(4, "nccl")``; ``"pipe2"`` -> ``(2, "tdist")``; else None."""
    m = VARIANT.match(variant or "")
    if not m or int(m.group(1)) < 2:
        return None
    return int(m.group(1)), ("nccl" if m.group(2) else "tdist")


def parse_ce(variant: str) -> Optional[int]:
    """``"ce4"``, ``"ce4s8"`` -> 4 (the copy-engine schedule, ``kernels/gemm_all_reduce_ce.py``); else None."""
    m = CE_VARIANT.match(variant or "")
    return int(m.group(1)) if m and int(m.group(1)) >= 2 else None


def parse_chain(variant: str) -> Optional[int]:
    """``"chain2"`` -> 2: the ring schedule with 2 chunks per rank and chain position
    (``kernels/gemm_all_reduce_chain.py``: ``world * 2`` row chunks); else None."""
    m = CHAIN_VARIANT.match(variant or "")
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


def ce_carveout(variant: str) -> int:
    """``"ce4s8"`` -> 8: SMs the chunk GEMMs leave free (cuBLAS SM carveout); ``"ce4"`` -> 0.

    Why (``benchmarks/results/overlap-probe-h200-w2-20261127-2138.json``, 2xH200): the chunks
    alone cost what the whole GEMM does and a copy-engine pull slows a GEMM beside it by 1-3%, yet
    ``ce`` ends 90-110 us after its GEMMs at o_proj/down_proj shapes, several times what the last
    chunk's bytes take at the measured 345 GB/s.  The suspect: the schedule's barrier and add
    kernels need SMs, which the next chunk's cuBLAS kernel holds to its end, so a chunk's
    reduction cannot run beside the next GEMM.  A carveout keeps a few SMs free for them.

    Measured (``calibrate-h200-tp2-20261127-2147-carveout.json``, 2xH200, M=4096): it helps where
    the GEMM is short (o_proj, K=4096: ``ce4`` 450.2 -> ``ce4s16`` 391.8 us) and costs where it is
    long (down_proj, K=12800: ``ce4`` 875.6 -> ``ce4s8`` 901.8, ``ce4s16`` 969.0), and never beats
    the zero-copy ``one_shot`` (370.4 / 896.8) or, by the margin, unfused (397.7 / 897.9); at W=4
    every ``ce`` form loses to unfused by 55-85%.  So the ``s<S>`` forms are not candidates of
    ``auto``; they stay for experiments (``impl="fused:ce4s16"``)."""
    m = CE_VARIANT.match(variant or "")
    return int(m.group(2)) if m and m.group(2) else 0


def chunk_bounds(m: int, chunks: int) -> Optional[list[tuple[int, int]]]:
    """``chunks`` row ranges covering ``[0, m)``, aligned to ``ROW_ALIGN`` (the last takes the
    remainder), or None if a chunk would have fewer than ``MIN_CHUNK_ROWS`` rows."""
    step = -(-m // chunks)
    step = -(-step // ROW_ALIGN) * ROW_ALIGN
    bounds = [(lo, min(lo + step, m)) for lo in range(0, m, step)]
    if len(bounds) != chunks or min(hi - lo for lo, hi in bounds) < MIN_CHUNK_ROWS:
        return None
    return bounds


def unsupported_reason(a: torch.Tensor, b: torch.Tensor, variant: str) -> Optional[str]:
    parsed = parse(variant)
    if parsed is None:
        return f"unknown pipelined variant {variant!r}"
    if chunk_bounds(a.shape[0], parsed[0]) is None:
        return f"M={a.shape[0]} too small for {parsed[0]} chunks of >= {MIN_CHUNK_ROWS} rows"
    if a.dim() != 2 or b.dim() != 2:
        return "pipelined gemm_all_reduce takes 2-D a and b"
    return None


def gemm_all_reduce(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], chunks: int,
                    reduce_: Callable[[torch.Tensor], None], side: torch.cuda.Stream) -> torch.Tensor:
    """``all_reduce(a @ b + bias)`` with the all-reduce of chunk i overlapping the GEMM of
    chunk i+1; ``reduce_(rows)`` all-reduces a contiguous [rows, N] view in place on the
    current stream (called with ``side`` current)."""
    bounds = chunk_bounds(a.shape[0], chunks)
    if bounds is None:
        raise ValueError(f"gemm_all_reduce: M={a.shape[0]} cannot be split into {chunks} chunks")
    main = torch.cuda.current_stream()
    out = a.new_empty((a.shape[0], b.shape[1]))                                  # [M, N]
    side.wait_stream(main)
    for lo, hi in bounds:
        rows = out[lo:hi]                                                        # [hi-lo, N] contiguous view
        if bias is None:
            torch.mm(a[lo:hi], b, out=rows)
        else:
            torch.addmm(bias, a[lo:hi], b, out=rows)
        done = torch.cuda.Event()
        done.record(main)
        with torch.cuda.stream(side):
            side.wait_event(done)
            reduce_(rows)
    main.wait_stream(side)
    return out


def nccl_reducer(group_name: str) -> Callable[[torch.Tensor], None]:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group
    pg = _resolve_process_group(group_name)
    return lambda rows: dist.all_reduce(rows, group=pg)


def tdist_reducer(ws) -> Callable[[torch.Tensor], None]:
    from tdcompile.kernels.all_reduce import all_reduce
    return lambda rows: all_reduce(ws, rows, out=rows, variant="two_shot", ctas=PIPE_CTAS)
