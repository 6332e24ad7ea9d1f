"""Assemble one bench table from several ``tdcompile bench`` JSONs of the same machine kind.

Rows are taken whole (all columns of a row come from ONE run, so every ratio in a row compares
cells measured side by side); a later file's row replaces an earlier one's.  Every row records
the file it came from (``"from"``), and the merged file lists every source with its command.

    python benchmarks/merge_bench.py OUT.json RUN1.json RUN2.json ...
"""
from __future__ import annotations

import json
import os
import sys


def merge(paths: list[str]) -> dict:
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append((p, json.load(f)))
    base = dict(runs[0][1])
    for p, r in runs[1:]:
        for k in ("world", "model", "layers", "dtype"):
            if r.get(k) != base.get(k):
                raise ValueError(f"{p}: {k}={r.get(k)!r} differs from {paths[0]}'s {base.get(k)!r}")
        if r.get("machine", {}).get("gpu") != base.get("machine", {}).get("gpu"):
            raise ValueError(f"{p}: another GPU ({r.get('machine', {}).get('gpu')})")
    rows, ran, errors, columns = {}, {}, {}, []
    for p, r in runs:
        for c in r.get("columns", []):
            if c not in columns:
                columns.append(c)
        for row in r.get("rows", []):
            rows[row["case"]] = {**row, "from": os.path.basename(p)}
            ran[row["case"]] = r.get("tdist_ops_ran", {}).get(row["case"], [])
            for k in list(errors):
                if k.startswith(row["case"] + " / "):
                    del errors[k]
            errors.update({k: v for k, v in r.get("errors", {}).items() if k.startswith(row["case"] + " / ")})
    order = [row["case"] for _, r in runs for row in r.get("rows", [])]
    base.update(rows=[rows[c] for c in dict.fromkeys(order)], columns=columns, tdist_ops_ran=ran, errors=errors,
                merged_from=[{"file": os.path.basename(p), "date": r.get("date"), "command": r.get("command")}
                             for p, r in runs],
                complete=all(r.get("complete", False) for _, r in runs) and not errors)
    return base


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    out = merge(argv[2:])
    with open(argv[1], "w") as f:
        json.dump(out, f, indent=2)
    for row in out["rows"]:
        print(f"{row['case']:30s} tdist/inductor {row.get('vs inductor')}   from {row['from']}")


if __name__ == "__main__":
    main(sys.argv)
