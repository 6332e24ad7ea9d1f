"""Engine, bench and sharded checkpoint loading on CPU: 2 ranks on gloo, one spawned job.

The job (``_worker``) runs every scenario once and rank 0 writes what it saw to a JSON file;
the tests assert on it. Each tiny-model compile costs ~10-20 s on 2 cores.
"""
from __future__ import annotations

import json
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_ranks import HANG_S, PG_TIMEOUT_S, finish, free_port

WORLD = 2
pytestmark = pytest.mark.slow


def _generate(model, backend, options, prompt, **kw):
    from tdcompile.engine import Engine

    eng = Engine(model, backend, options, max_batch=4, max_seq=prompt.shape[1] + 6)
    return eng.generate(prompt, 6, **kw).tokens.tolist()


def _scenarios(tmp: str, rank: int) -> dict:
    import argparse

    from tdcompile import backend, bench, models, tp
    from tdcompile.report import Report

    out = {}
    cfg = tp.tiny_qwen3_config()
    prompt = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))  # [B, S]

    # 1. greedy tokens: tdist (fused: the tdist ops run, via their reference impls) == eager == unsharded
    model = models.build_sharded(cfg, "hf", dtype=torch.float32, seed=1)
    out["eager"] = _generate(model, "eager", None, prompt)
    report = Report()
    backend._sinks.append(report)
    try:
        out["tdist"] = _generate(model, "tdist", {"strategy": "fused"}, prompt)
    finally:
        backend._sinks.remove(report)
    out["tdist_rewritten"] = sum(d.rewritten for d in report.matches)
    out["topp_eager"] = _generate(model, "eager", None, prompt, temperature=0.8, top_p=0.9, seed=5)
    ref = models.build_sharded(cfg, "none", dtype=torch.float32, seed=1, progress=False)
    out["reference"] = _generate(ref, "eager", None, prompt)

    # 2. checkpoint: rank 0 saves a tiny model; every rank loads only its shards of it
    ckpt = os.path.join(tmp, "tiny_ckpt")
    if rank == 0:
        tp.build_model(tp.tiny_qwen3_config(), seed=7).save_pretrained(ckpt)
    dist.barrier()
    full = tp.build_model(checkpoint=ckpt)
    sharded = models.build_sharded(None, "hf", dtype=torch.float32, checkpoint=ckpt, progress=False)
    with torch.no_grad():
        diff = (full(prompt).logits - sharded(prompt).logits).abs().max().item()
    q = sharded.model.layers[1].self_attn.q_proj.weight.to_local()                 # [out/w, in]
    q_full = full.model.layers[1].self_attn.q_proj.weight                          # [out, in]
    out["ckpt_logit_diff"] = diff
    out["ckpt_shard_ok"] = bool(torch.equal(q, q_full.chunk(WORLD, 0)[rank]))
    out["ckpt_local_rows"] = q.shape[0]

    # 3. bench --quick end to end, then --check (tdist fused vs eager TP vs the unsharded model)
    p = argparse.ArgumentParser()
    bench.add_bench_args(p)
    res = bench.bench_main(p.parse_args(["--quick", "--bursts", "2", "--out", os.path.join(tmp, "results")]))
    out["bench"] = {k: res[k] for k in ("rows", "errors", "columns", "json", "png")}
    noise = bench.bench_main(p.parse_args(["--quick", "--columns", "inductor,inductor_again,tdist", "--cases", "MLP",
                                           "--trace", "tdist", "--out", os.path.join(tmp, "noise")]))
    out["noise"] = {k: noise[k] for k in ("rows", "errors", "columns")}
    out["noise"]["traces"] = {k: os.path.getsize(os.path.join(tmp, "noise", v))
                              for k, v in noise["traces"].items()}
    chk = bench.bench_main(p.parse_args(["--check", "--layers", "1", "--ctx", "8", "--strategy", "fused",
                                         "--out", os.path.join(tmp, "results")]))
    out["check"] = {"passed": chk["passed"], "pairs": chk["pairs"], "reference": chk["reference"]}
    return out


def _worker(rank: int, port: int, tmp: str) -> None:
    import faulthandler
    from datetime import timedelta
    faulthandler.dump_traceback_later(HANG_S, exit=True)      # a hang fails the test with its stacks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        out = _scenarios(tmp, rank)
    except Exception:  # noqa: BLE001
        out = {"error": traceback.format_exc()}
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    finish()


@pytest.fixture(scope="module")
def job():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(free_port(), tmp), nprocs=WORLD, join=True)
        outs = []
        for r in range(WORLD):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                outs.append(json.load(f))
        for o in outs:
            assert "error" not in o, o.get("error")
        for o in outs:  # files the tests look at, before the directory goes
            o["files"] = {k: os.path.exists(o["bench"][k]) for k in ("json", "png")}
            with open(o["bench"]["json"]) as f:
                o["saved"] = json.load(f) if o["files"]["json"] else None
            break
        yield outs


def test_tdist_greedy_tokens_equal_eager(job):
    for o in job:
        assert o["tdist_rewritten"] > 0, "tdist rewrote nothing: its ops did not run"
        assert o["tdist"] == o["eager"] == o["reference"]
        assert len(o["eager"]) == 2 and len(o["eager"][0]) == 6
    assert job[0]["topp_eager"] == job[1]["topp_eager"]  # ranks draw the same tokens


def test_checkpoint_loading(job):
    for o in job:
        assert o["ckpt_logit_diff"] < 1e-4
        assert o["ckpt_shard_ok"] and o["ckpt_local_rows"] == 256 // WORLD


def test_bench_quick_end_to_end(job):
    b = job[0]["bench"]
    assert not b["errors"], b["errors"]
    assert b["columns"] == ["eager", "inductor", "bound", "tdist"]  # async TP needs CUDA
    assert len(b["rows"]) == 5
    for row in b["rows"]:
        for col in ("eager TP ms", "inductor ms", "bound ms", "tdist ms"):
            assert isinstance(row[col], float) and row[col] > 0, row
        assert row["async-TP ms"] == "n/a"
        assert row["gap closed"] == "n/a" or isinstance(row["gap closed"], float)
        best = min(row["eager TP ms"], row["inductor ms"]) / row["tdist ms"]
        assert row["vs best baseline"] == pytest.approx(best, rel=2e-2, abs=2e-3)
    assert job[0]["files"] == {"json": True, "png": True}
    saved = job[0]["saved"]
    assert saved["versions"]["torch"] == torch.__version__ and saved["command"] and saved["machine"]
    # back-to-back calls: the decode rows (the E2E one through the Engine), every column, ms per call
    decode = sorted(r["case"] for r in b["rows"] if "decode" in r["case"])
    assert decode and sorted(saved["burst_ms"]) == decode, saved["burst_ms"]
    assert all(set(v) == {"eager", "inductor", "bound", "tdist"} and min(v.values()) > 0
               for v in saved["burst_ms"].values())


def test_the_noise_column_times_inductor_a_second_time(job):
    """``inductor_again``: the same code compiled and timed twice in one run; its ratio is the
    spread a tdist ratio near 1 is read against."""
    b = job[0]["noise"]
    assert not b["errors"], b["errors"]
    assert sorted(b["columns"]) == ["inductor", "inductor_again", "tdist"]
    (row,) = b["rows"]
    assert isinstance(row["inductor again ms"], float) and row["inductor again ms"] > 0
    assert row["inductor / again"] == pytest.approx(row["inductor ms"] / row["inductor again ms"], rel=2e-2, abs=2e-3)
    # --trace tdist: one Chrome trace of the tdist column per rank, named in the JSON
    assert list(b["traces"]) == [f"{row['case']} / tdist"] and all(n > 0 for n in b["traces"].values())


def test_check_mode(job):
    c = job[0]["check"]
    assert c["reference"] == "single device"
    assert c["passed"], c["pairs"]
    assert len(c["pairs"]) == 6  # 3 pairs x (prefill, decode)
