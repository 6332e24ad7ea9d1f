"""Where the host time of a ``tdist`` op call goes (real processes, un-graphed).

    torchrun --nproc_per_node W scripts/host_profile.py --out DIR

For each (op, impl) at Qwen3-32B per-rank shapes: ``measure.host_us`` of the op call (10 calls
back to back, best of 3) and, on rank 0, a cProfile of 30 calls (top entries by own time).  Then
the host cost of the primitives an op body is made of.  Writes ``host-profile-w<W>.json`` and
``host-profile-w<W>.txt``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _cases(W: int):
    qkv, gate_up, o_k, down_k = 10240 // W, 51200 // W, 8192 // W, 25600 // W
    return [
        ("all_gather_gemm", 4096, qkv, 5120, ["unfused", "fused:ce", "symm_mem", "auto"]),
        ("all_gather_gemm", 4096, gate_up, 5120, ["unfused", "fused:ce"]),
        ("gemm_reduce_scatter", 4096, 5120, down_k, ["unfused", "fused:ce", "symm_mem"]),
        ("gemm_all_reduce_rmsnorm", 4096, 5120, o_k, ["unfused", "fused:two_shot"]),
        ("all_reduce_rmsnorm", 4096, 5120, 0, ["unfused", "fused:two_shot"]),
        ("all_reduce_rmsnorm", 128, 5120, 0, ["unfused", "fused:lamport", "fused:lamport2"]),
        ("all_reduce", 4096, 5120, 0, ["unfused", "fused:two_shot"]),
        ("gemm_all_reduce", 128, 5120, down_k, ["unfused", "fused:one_shot"]),
    ]


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _noop(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty), mask=offs < n * 0)


@triton.jit
def _noop7(p, off, e, err, code, r, t, BLOCK: tl.constexpr):
    pass


def _primitives(ws) -> dict:
    from tdcompile.measure import host_us
    from tdcompile.kernels import signals as sig
    from tdcompile.kernels.symm import MAX_WORLD, PAD_SLOTS
    x = torch.empty(4096, 5120, device="cuda", dtype=torch.bfloat16)
    s = ws.side
    ev = torch.cuda.Event()
    e = ws.bump_epoch("all_reduce")

    def ctx():
        with torch.cuda.stream(s):
            pass
    args = (ws.pads.ptrs, 0 * PAD_SLOTS * MAX_WORLD, e, ws.err_addr, sig.error_code(0, ws.rank, 1), ws.rank,
            ws.timeout_us)
    return {
        "torch.empty": host_us(lambda: torch.empty(4096, 5120, device="cuda", dtype=torch.bfloat16), calls=100),
        "slice+view": host_us(lambda: x[128:256].view(torch.uint8), calls=100),
        "event.record": host_us(lambda: ev.record(), calls=100),
        "stream ctx": host_us(ctx, calls=100),
        "wait_stream": host_us(lambda: s.wait_stream(torch.cuda.current_stream()), calls=100),
        "ws.check": host_us(lambda: ws.check(), calls=100),
        "bump_epoch": host_us(lambda: ws.bump_epoch("all_reduce"), calls=100),
        "mm 128x5120x5120": host_us(lambda: torch.mm(x[:128], x[:5120].t()), calls=100),
        "triton launch (JIT)": host_us(lambda: _noop[(1,)](x, 7, BLOCK=128, num_warps=1), calls=100),
        "triton launch (7 args)": host_us(lambda: _noop7[(1,)](*args, BLOCK=128, num_warps=1), calls=100),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = p.parse_args()
    rank, W = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    import tdcompile.ops  # noqa: F401  (registers tdist::*)
    from tdcompile import measure, measured
    from tdcompile.ops import cuda as opc
    g = dist.group.WORLD.group_name
    rows, text = [], io.StringIO()
    for op, m, n, k, impls in _cases(W):
        key = measured.Key.of(op, m=m, n=n, k=k, dtype=torch.bfloat16, world=W)
        args = measure._inputs(key, rank)
        for impl in impls:
            call = (lambda: measure._call(key, impl, args, g))
            before = dict(opc.RAN_IMPL)
            try:
                call(), call()
                torch.cuda.synchronize()
                host = measure.host_us(call)
                dev = measure.graph_us(call)
            except Exception as e:  # noqa: BLE001
                host, dev = None, None
                print(f"[{rank}] {op} {impl}: {type(e).__name__}: {e}", flush=True)
            ran = {f"{o}/{i}": c - before.get((o, i), 0) for (o, i), c in opc.RAN_IMPL.items()
                   if c != before.get((o, i), 0)}
            rows.append(dict(op=op, m=m, n=n, k=k, impl=impl, host_us=host, device_us=dev, ran=ran))
            if rank == 0:
                print(f"{op:24s} M={m:5d} {impl:16s} host {host and round(host, 1)} device {dev and round(dev, 1)}",
                      flush=True)
            if rank == 0 and host is not None and impl != "unfused":
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(30):
                    call()
                pr.disable()
                torch.cuda.synchronize()
                text.write(f"\n===== {op} M={m} n={n} k={k} {impl}: host {host:.1f} us/call\n")
                pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(25)
            elif host is not None and impl != "unfused":
                for _ in range(30):
                    call()
                torch.cuda.synchronize()
            dist.barrier()
    from tdcompile.kernels import symm
    prims = _primitives(symm.get_workspace(g))
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        doc = dict(world=W, date=time.strftime("%Y-%m-%d %H:%M:%S"), device=torch.cuda.get_device_name(),
                   torch=torch.__version__, command=" ".join(sys.argv), rows=rows, primitives_host_us=prims)
        with open(os.path.join(a.out, f"host-profile-w{W}.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(a.out, f"host-profile-w{W}.txt"), "w") as f:
            f.write(text.getvalue())
        print(json.dumps(prims, indent=1), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
