"""Starting 2 CPU ranks (gloo) for a test: a free port, worker processes that print one
``RESULT <json>`` line, and collecting those results (a worker that fails or hangs fails the test)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(worker: str, world: int, *args: str) -> list:
    """``python worker RANK PORT *args`` for every rank, in the background."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return [subprocess.Popen([sys.executable, os.path.abspath(worker), str(rk), str(port), *args], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rk in range(world)]


def collect(procs: list, timeout: float = 300) -> list[dict]:
    """Each rank's ``RESULT`` json, in rank order."""
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("gloo workers timed out")
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"worker failed (rc={p.returncode}):\n{stderr[-4000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results
