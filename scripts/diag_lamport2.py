"""Bisect a simulated-rank failure of the Lamport kernels (one GPU; ``W=2|4``, default 4).

It replaces the first diagnostic of 2026-11-27 (sizes, grids and chunk sizes varied separately),
which did not reproduce the failure; this one also counts Triton compiles during the run, which
found the cause (a variant compiled at its first launch while simulated peers spun).

test_back_to_back_varying_sizes[4-*-lamport2] times out (2026-11-27, H200) while W=2 passes and
the W=4 real-process sweep passes.  Each trial below runs a prefix of the test's exact call list
back-to-back in a FRESH simulated world; the shortest failing prefix names the call (shape, grid,
warps) and the one before it.  Control trials: the one-shot kernel on the same list, the list
with the grid capped at 8 CTAs, and a fixed chunk size.  Prints one line per trial."""
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
from test_all_reduce_lamport import check, kernel_fn, rank_inputs, sizes  # noqa: E402
from tdcompile.kernels.symm import SimWorld  # noqa: E402


def ncompiled(kernel):
    """Compiled variants of a Triton kernel (all devices); -1 if this Triton hides them."""
    try:
        return sum(len(v[0]) for v in kernel.device_caches.values())
    except Exception:  # noqa: BLE001
        return -1


EVENTS = []


def instrument():
    """Record host calls that can serialise the GPU while a rank's kernel spins."""
    import tdcompile.kernels.symm as symm
    sync0 = torch.cuda.synchronize

    def sync(*a, **k):
        EVENTS.append("synchronize")
        return sync0(*a, **k)
    torch.cuda.synchronize = sync
    reg0 = symm.Workspace.region

    def region(self, name, nbytes, *a, **k):
        before = self.regions.get(name)
        out = reg0(self, name, nbytes, *a, **k)
        if before is None or before.local.data_ptr() != out.local.data_ptr():
            EVENTS.append(f"region {name} {nbytes}")
        return out
    symm.Workspace.region = region


def run(kernel, W, dtype, shapes, ctas, warps, timeout_s=2.0, prealloc=True):
    """True if the calls pass back-to-back in a fresh world, else the error text (and the
    host events and new Triton compilations seen during the back-to-back run)."""
    from tdcompile.kernels import all_reduce_lamport as l1, all_reduce_lamport2 as l2
    k = l1._lamport_kernel if kernel == "lamport" else l2._lamport2_kernel
    fn = kernel_fn(kernel)
    sim = SimWorld(W, timeout_s=timeout_s)

    def loop(ws, xs, cs, wl, ol=None):
        got = []
        for i, (x, c, w) in enumerate(zip(xs, cs, wl)):
            got.append((yield from fn(ws, x, out=None if ol is None else ol[i], ctas=c, num_warps=w)))
        return got
    for w in sorted(set(warps), key=str):
        x1 = rank_inputs((1, 8), W, dtype, seed=5)
        sim.run(lambda ws, x: loop(ws, [x], [None], [w]), [(x1[r],) for r in range(W)])
    sim.check()
    xs = [rank_inputs(s, W, dtype, seed=1000 * W + i) for i, s in enumerate(shapes)]
    ol = [[torch.full(s, float("nan"), device="cuda", dtype=dtype) for s in shapes] for _ in range(W)] \
        if prealloc else [None] * W
    torch.cuda.synchronize()
    EVENTS.clear()
    nc = ncompiled(k)
    stats = torch.cuda.memory_stats().get("segment.all.allocated", 0)
    try:
        outs = sim.run(lambda ws, xl, o: loop(ws, xl, ctas, warps, o), [([x[r] for x in xs], ol[r]) for r in range(W)])
        ev = f" events={EVENTS[:6]} new_compiles={ncompiled(k) - nc} " \
             f"new_segments={torch.cuda.memory_stats().get('segment.all.allocated', 0) - stats}"
        if EVENTS or ncompiled(k) != nc:
            print("   host events during the run:" + ev, flush=True)
        sim.check()
        for i in range(len(shapes)):
            for r in range(W):
                check(outs[r][i], xs[i], dtype, i)
        return True
    except Exception as e:  # noqa: BLE001
        ev = f" events={EVENTS[:6]} new_compiles={ncompiled(k) - nc}"
        return f"{type(e).__name__}: {str(e)[:60]}" + ev


def draws(W, dtype):
    """Exactly the test's shapes, grids and chunk sizes."""
    rnd = random.Random(W * 31 + (dtype == torch.float16))
    shapes = sizes(W + 10 * (dtype == torch.float16))
    rnd.shuffle(shapes)
    shapes = shapes + shapes[::-1]
    ctas = [rnd.choice([None, None, 1, 3, 8, 64, 128]) for _ in shapes]
    warps = [rnd.choice([None, 4, 8, 16]) for _ in shapes]
    return shapes, ctas, warps


def main():
    W = int(os.environ.get("W", "4"))
    dtype = torch.bfloat16
    shapes, ctas, warps = draws(W, dtype)
    n = len(shapes)
    print(f"W={W} sms={torch.cuda.get_device_properties(0).multi_processor_count} calls={n} "
          f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS')}", flush=True)
    instrument()
    for rep in range(3):
        print(f"rep {rep} lamport2 test list:", run("lamport2", W, dtype, shapes, ctas, warps), flush=True)
        print(f"rep {rep} lamport  test list:", run("lamport", W, dtype, shapes, ctas, warps), flush=True)
        print(f"rep {rep} lamport2 no prealloc:", run("lamport2", W, dtype, shapes, ctas, warps, prealloc=False),
              flush=True)
    full = run("lamport2", W, dtype, shapes, ctas, warps)
    print("lamport2 test list:", full, flush=True)
    print("lamport2 grid<=16:", run("lamport2", W, dtype, shapes, [min(c or 128, 16) for c in ctas], warps),
          flush=True)
    print("lamport2 grid<=8:", run("lamport2", W, dtype, shapes, [min(c or 128, 8) for c in ctas], warps), flush=True)
    print("lamport2 warps=8:", run("lamport2", W, dtype, shapes, ctas, [8] * n), flush=True)
    print("lamport2 grid default:", run("lamport2", W, dtype, shapes, [None] * n, warps), flush=True)
    print("lamport2 sizes fixed 128x5120:", run("lamport2", W, dtype, [(128, 5120)] * n, ctas, warps), flush=True)
    if full is True:
        return
    lo, hi = 1, n                       # shortest failing prefix
    while lo < hi:
        mid = (lo + hi) // 2
        if run("lamport2", W, dtype, shapes[:mid], ctas[:mid], warps[:mid]) is True:
            lo = mid + 1
        else:
            hi = mid
    print(f"shortest failing prefix: {lo} calls", flush=True)
    for i in range(max(0, lo - 4), lo):
        print(f"  call {i}: shape={shapes[i]} n={torch.Size(shapes[i]).numel()} ctas={ctas[i]} warps={warps[i]}",
              flush=True)
    k = lo - 1                          # the failing call alone after its predecessor
    if k >= 1:
        print("  pair (k-1, k):", run("lamport2", W, dtype, shapes[k - 1:k + 1], ctas[k - 1:k + 1],
                                        warps[k - 1:k + 1]), flush=True)
    print("  call k alone:", run("lamport2", W, dtype, shapes[k:k + 1], ctas[k:k + 1], warps[k:k + 1]), flush=True)


if __name__ == "__main__":
    main()
