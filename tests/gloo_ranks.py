"""Starting CPU ranks (gloo) for a test: worker processes that meet through a rendezvous file (no
TCP port to race for), print one ``RESULT <json>`` line, and are collected (a worker that fails
or hangs fails the test, with every rank's stderr -- a hung worker first dumps its stacks).

A worker is ``python WORKER RANK RDZV *args``, calls ``init(rank, world, rdzv)`` first and
``finish()`` last."""
from __future__ import annotations

import faulthandler
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600.0
"""How long ``collect`` waits for every rank of a start (on a loaded 2-core CI machine the
compiling workers take a few minutes)."""
HANG_S = TIMEOUT_S - 60
"""After this long a worker dumps all its threads' stacks to stderr and exits (so a hang shows
where it waits, before ``collect`` gives up)."""
PG_TIMEOUT_S = 420
"""A collective that waits this long for a peer (one that died) raises, naming the collective."""


def free_port() -> int:
    """A port free now (for tests that spawn ranks through ``torch.multiprocessing``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(worker: str, world: int, *args: str) -> list:
    """``python worker RANK RDZV *args`` for every rank, in the background. The workers run one
    thread each and Inductor compiles in-process: several ranks share the machine's cores."""
    rdzv_dir = tempfile.mkdtemp(prefix="gloo-rdzv-")                   # removed by collect()
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1", "TDCOMPILE_TEST_HANG_S": str(HANG_S)}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(worker), str(rk), "file://" + os.path.join(rdzv_dir, "store"),
                               *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rk in range(world)]
    for p in procs:
        p.rdzv_dir = rdzv_dir
    return procs


def init(rank: int, world: int, rdzv: str) -> None:
    """A worker's process group (gloo over ``rdzv``), with the stack dump armed against a hang."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    faulthandler.dump_traceback_later(float(os.environ.get("TDCOMPILE_TEST_HANG_S", HANG_S)), exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=world,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))


def finish() -> None:
    """A worker's last step: every rank waits for the others, then tears its group down (a rank
    that exits or tears down while its peer still finishes the last call can abort that peer:
    "terminate called without an active exception", ~1 in 16 runs without this, 0 in 44 with)."""
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


def kill(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()


def collect(procs: list, timeout: float = TIMEOUT_S) -> list[dict]:
    """Each rank's ``RESULT`` json, in rank order."""
    outs = []
    try:
        for p in procs:
            try:
                outs.append(p.communicate(timeout=timeout))
            except subprocess.TimeoutExpired:
                kill(procs)
                tails = "\n".join(f"--- rank {rk} stderr:\n{(q.communicate()[1] or '')[-3000:]}"
                                  for rk, q in enumerate(procs))
                pytest.fail(f"gloo workers timed out after {timeout:.0f} s\n{tails}")
    finally:                                    # the ranks are gone: so is their rendezvous
        for d in {getattr(p, "rdzv_dir", None) for p in procs} - {None}:
            shutil.rmtree(d, ignore_errors=True)
    results = []
    for rk, (p, (stdout, stderr)) in enumerate(zip(procs, outs)):
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"rank {rk} failed (rc={p.returncode}):\n{stderr[-4000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results
