"""Summarise the bench's Chrome traces (``--trace``) of one row: per column and rank, the device
time of one call split by kernel family, the idle gaps between kernels, and for every
collective kernel its duration and its start skew across ranks.

    python3 scripts/trace_summary.py DIR [--row E2E_decode_bsz_128] [--json out.json]

Each trace holds 3 calls; the last one is summarised (see ``last_call``).
Timestamps of different ranks come from one host clock (kineto), so cross-rank skew is
approximate (~1 us)."""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

COMM = re.compile(r"lamport|all_reduce|allreduce|nccl|_ar_|two_shot|one_shot|reduce_scatter|all_gather", re.I)


def family(name: str) -> str:
    n = name.lower()
    if COMM.search(n):
        return "comm:" + name[:60]
    if "nvjet" in n or "gemm" in n or "cutlass" in n or "splitk" in n:
        return "gemm"
    if "sdpa" in n or "flash" in n or "attention" in n:
        return "attention"
    if n.startswith("triton_"):
        return "triton (inductor)"
    return "other:" + name[:40]


def kernels(path: str) -> list:
    ev = json.load(open(path))["traceEvents"]
    ks = sorted((e for e in ev if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    return [(float(e["ts"]), float(e["dur"]), e["name"]) for e in ks]


def last_call(ks: list) -> list:
    """The last call's kernels: a call starts with the row's rewind (a run of kernels named like the
    trace's first one, e.g. the cache-position fills), which is dropped; if there is none, all."""
    first = ks[0][2]
    starts = [i for i in range(len(ks)) if ks[i][2] == first and (i == 0 or ks[i - 1][2] != first)]
    seg = ks[starts[-1]:]
    while len(seg) > 1 and seg[0][2] == first:
        seg = seg[1:]
    return seg


def summarise(ks: list) -> dict:
    span = ks[-1][0] + ks[-1][1] - ks[0][0]
    busy = collections.Counter()
    for ts, dur, name in ks:
        busy[family(name)] += dur
    gaps = [ks[i][0] - (ks[i - 1][0] + ks[i - 1][1]) for i in range(1, len(ks))]
    comm = [(ts - ks[0][0], dur, name) for ts, dur, name in ks if COMM.search(name)]
    return {"span_us": round(span, 1), "kernels": len(ks), "busy_us": round(sum(busy.values()), 1),
            "idle_us": round(sum(g for g in gaps if g > 0), 1),
            "by_family_us": {k: round(v, 1) for k, v in busy.most_common()}, "comm": comm}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--row", default="")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    out = {}
    files = sorted(glob.glob(os.path.join(a.dir, f"*trace-*{a.row}*-rank*.json")))
    by_col = collections.defaultdict(dict)
    for f in files:
        m = re.search(r"trace-(.*)-(\w+)-rank(\d+)\.json$", os.path.basename(f))
        by_col[(m.group(1), m.group(2))][int(m.group(3))] = last_call(kernels(f))
    for (row, col), ranks in sorted(by_col.items()):
        print(f"== {row} / {col}")
        res = {}
        for r, ks in sorted(ranks.items()):
            s = summarise(ks)
            res[r] = s
            print(f"  rank {r}: span {s['span_us']} us, {s['kernels']} kernels, busy {s['busy_us']}, idle {s['idle_us']}")
            for k, v in list(s["by_family_us"].items())[:8]:
                print(f"      {v:9.1f}  {k}")
        comms = [res[r]["comm"] for r in sorted(res)]
        if comms and comms[0]:
            n = min(len(c) for c in comms)
            durs = [[c[i][1] for c in comms] for i in range(n)]
            # absolute start per rank: kernel start relative to that rank's call start is not comparable,
            # so use absolute timestamps
            abs_start = [[ranks[r][0][0] + res[r]["comm"][i][0] for r in sorted(res)] for i in range(n)]
            skew = [max(s) - min(s) for s in abs_start]
            print(f"  {n} comm kernels: duration per kernel (max over ranks) median "
                  f"{sorted(max(d) for d in durs)[n // 2]:.1f} us, min-rank median {sorted(min(d) for d in durs)[n // 2]:.1f};"
                  f" start skew across ranks median {sorted(skew)[n // 2]:.1f} us, max {max(skew):.1f}")
            for i in range(min(n, 6)):
                print(f"    #{i}: {comms[0][i][2][:50]} durs {[round(x, 1) for x in durs[i]]} skew {skew[i]:.1f}")
            res["comm_summary"] = {"n": n, "durations": durs, "start_skew": skew}
        out[f"{row}/{col}"] = res
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
