"""Did ``strategy="auto"`` pick the fastest strategy?  (issue 4's accuracy table)

Reads a ``tdcompile bench`` JSON that was run with the forced-strategy columns
``tdist:unfused,tdist:fused,tdist:sequence_parallel`` next to ``tdist`` (auto), and for each
case reports the fastest strategy, auto's time, and whether auto is the fastest or within
3% of it and never more than 1% slower than unfused. Only measured numbers are used.

    python benchmarks/cost_model_accuracy.py benchmarks/results/bench-....json
"""
import json
import sys

from tabulate import tabulate

STRATS = ("tdist:unfused", "tdist:fused", "tdist:sequence_parallel")


def main(path: str) -> int:
    data = json.load(open(path))
    out, ok_count = [], 0
    for row in data["rows"]:
        times = {s: row.get(f"{s} ms") for s in STRATS}
        times = {s: t for s, t in times.items() if isinstance(t, (int, float))}
        auto = row.get("tdist ms")
        if not times or not isinstance(auto, (int, float)):
            continue
        best = min(times, key=times.get)
        within = auto <= times[best] * 1.03
        not_worse = "tdist:unfused" not in times or auto <= times["tdist:unfused"] * 1.01
        ok_count += within and not_worse
        out.append({"case": row["case"], **{s.split(":")[1]: t for s, t in times.items()}, "auto": auto,
                    "fastest": best.split(":")[1], "auto within 3%": within, "auto <= unfused+1%": not_worse})
    print(tabulate(out, headers="keys"))
    print(f"\nauto fastest or within 3% (and <= unfused + 1%) in {ok_count}/{len(out)} cases (target >= 90%)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
