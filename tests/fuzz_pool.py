"""A pool of 2 gloo ranks (tests/fuzz_worker.py processes) that runs fuzz cases by seed.

Started once per test session and shared by every case: a case costs one compile per rank,
not a process start. A rank that errors, dies or stops answering may leave the other rank
inside a collective, so after any such case the pool is restarted before the next one.
"""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from gloo_ranks import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORLD = 2


class FuzzPool:
    def __init__(self, case_timeout_s: float = 240.0):
        self.case_timeout_s = case_timeout_s
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        self.restarts = 0

    # -- lifetime ----------------------------------------------------------------------------
    def start(self) -> None:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "TDIST_FUZZ_STACKS_S": str(max(1.0, self.case_timeout_s - 30))}   # a hung case shows its stacks
        self.logs = [tempfile.TemporaryFile(mode="w+") for _ in range(WORLD)]
        self.procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "fuzz_worker.py"), str(rank), str(port)],
                                       cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=self.logs[rank], text=True, bufsize=1)
                      for rank in range(WORLD)]
        answers = self._read_all(120.0)
        if any(a is None or "ready" not in a for a in answers):
            tails = self.stderr_tails()
            self.close()
            raise RuntimeError(f"fuzz ranks did not start: {answers}\n{tails}")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                f.close()
        for f in self.logs:
            f.close()
        self.procs, self.logs = [], []

    def restart(self) -> None:
        self.close()
        self.restarts += 1
        self.start()

    # -- cases -------------------------------------------------------------------------------
    def run(self, seed: int, strategy: str | None = None) -> list[dict]:
        """Both ranks' results for ``seed`` (``{"error": ...}`` for a rank that died or hung);
        ``strategy`` overrides the case's."""
        if not self.procs:
            self.start()
        for p in self.procs:
            p.stdin.write(f"{seed} {strategy}\n" if strategy else f"{seed}\n")
            p.stdin.flush()
        answers = self._read_all(self.case_timeout_s)
        results = []
        for rank, a in enumerate(answers):
            if a is None:
                a = {"seed": seed, "error": f"rank {rank} died or gave no answer within {self.case_timeout_s:.0f} s",
                     "fallback": [], "rewritten": 0, "patterns": []}
            results.append(a)
        if any(r["error"] for r in results):
            tails = self.stderr_tails()
            for r in results:
                if r["error"]:
                    r["stderr"] = tails
            self.restart()
        return results

    def _read_all(self, timeout_s: float) -> list:
        """One JSON line from every rank, or None for a rank that died or timed out."""
        out = [None] * WORLD
        sel = selectors.DefaultSelector()
        for rank, p in enumerate(self.procs):
            sel.register(p.stdout, selectors.EVENT_READ, rank)
        deadline = time.monotonic() + timeout_s
        pending = set(range(WORLD))
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
                rank = key.data
                line = key.fileobj.readline()
                sel.unregister(key.fileobj)
                pending.discard(rank)
                if line:
                    out[rank] = json.loads(line)
        sel.close()
        return out

    def stderr_tails(self, chars: int = 6000) -> str:
        tails = []
        for rank, f in enumerate(self.logs):
            f.flush()
            f.seek(0)
            tails.append(f"--- rank {rank} stderr (tail) ---\n{f.read()[-chars:]}")
        return "\n".join(tails)
