"""``benchmarks/merge_bench.py``: one table from whole rows of several bench runs."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import merge_bench  # noqa: E402


def _run(tmp_path, name, rows, errors=None, gpu="NVIDIA H200", world=4, complete=True):
    data = {"world": world, "model": "qwen3-32b", "layers": 8, "dtype": "bf16", "machine": {"gpu": gpu},
            "command": f"bench {name}", "date": "2026-11-27", "columns": ["inductor", "tdist"],
            "rows": [{"case": c, "inductor ms": i, "tdist ms": t, "vs inductor": round(i / t, 3)} for c, i, t in rows],
            "tdist_ops_ran": {c: [f"op={name}"] for c, _, _ in rows}, "errors": errors or {}, "complete": complete}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_later_run_replaces_whole_rows_and_its_errors_and_says_where_each_row_came_from(tmp_path):
    a = _run(tmp_path, "a", [("MLP", 1.0, 0.9), ("E2E decode", 3.0, 3.3)],
             errors={"E2E decode / tdist": "RuntimeError: timed out"})
    b = _run(tmp_path, "b", [("E2E decode", 2.9, 2.7)])
    out = merge_bench.merge([a, b])
    rows = {r["case"]: r for r in out["rows"]}
    assert [r["case"] for r in out["rows"]] == ["MLP", "E2E decode"]             # first-seen order
    assert rows["MLP"]["from"] == "a.json" and rows["MLP"]["tdist ms"] == 0.9
    assert rows["E2E decode"]["from"] == "b.json" and rows["E2E decode"]["inductor ms"] == 2.9   # whole row
    assert out["errors"] == {} and out["complete"] is True                       # the failed cell was replaced
    assert out["tdist_ops_ran"] == {"MLP": ["op=a"], "E2E decode": ["op=b"]}
    assert [m["file"] for m in out["merged_from"]] == ["a.json", "b.json"]


def test_runs_of_another_machine_or_model_are_refused(tmp_path):
    a = _run(tmp_path, "a", [("MLP", 1.0, 0.9)])
    with pytest.raises(ValueError, match="another GPU"):
        merge_bench.merge([a, _run(tmp_path, "h100", [("MLP", 1.0, 0.9)], gpu="NVIDIA H100")])
    with pytest.raises(ValueError, match="world"):
        merge_bench.merge([a, _run(tmp_path, "tp2", [("MLP", 1.0, 0.9)], world=2)])


def test_an_error_that_no_later_run_replaced_keeps_the_table_incomplete(tmp_path):
    a = _run(tmp_path, "a", [("MLP", 1.0, 0.9), ("E2E", 3.0, 3.3)], errors={"E2E / tdist": "boom"})
    b = _run(tmp_path, "b", [("MLP", 1.0, 0.95)])
    out = merge_bench.merge([a, b])
    assert out["errors"] == {"E2E / tdist": "boom"} and out["complete"] is False
