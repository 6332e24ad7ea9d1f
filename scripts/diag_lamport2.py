"""Bisect the two-shot Lamport sim failures (one GPU, simulated ranks): which of varying sizes,
grids and chunk sizes makes back-to-back calls time out; then call by call with a sync between."""
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
from test_all_reduce_lamport import check, rank_inputs, sizes  # noqa: E402
from tdcompile.kernels.all_reduce_lamport2 import all_reduce_lamport2  # noqa: E402
from tdcompile.kernels.symm import SimWorld  # noqa: E402


def loop(ws, xs, ctas, warps):
    got = []
    for x, c, w in zip(xs, ctas, warps):
        got.append((yield from all_reduce_lamport2(ws, x, ctas=c, num_warps=w)))
    return got


def trial(W, dtype, shapes, ctas, warps, tag):
    sim = SimWorld(W, timeout_s=2)
    for w in sorted(set(warps), key=str):
        x1 = rank_inputs((1, 8), W, dtype, seed=5)
        sim.run(lambda ws, x: loop(ws, [x], [None], [w]), [(x1[r],) for r in range(W)])
    sim.check()
    xs = [rank_inputs(s, W, dtype, seed=3000 + i) for i, s in enumerate(shapes)]
    try:
        outs = sim.run(lambda ws, xl: loop(ws, xl, ctas, warps), [([x[r] for x in xs],) for r in range(W)])
        sim.check()
        for i in range(len(shapes)):
            for r in range(W):
                check(outs[r][i], xs[i], dtype, i)
        print(f"{tag}: ok", flush=True)
        return True
    except Exception as e:  # noqa: BLE001
        print(f"{tag}: FAIL {type(e).__name__}: {str(e)[:150]}", flush=True)
        return False


def one_by_one(W, dtype, shapes, ctas, warps, tag):
    sim = SimWorld(W, timeout_s=2)
    for i, (s, c, w) in enumerate(zip(shapes, ctas, warps)):
        xi = rank_inputs(s, W, dtype, seed=4000 + i)
        try:
            outs = sim.run(lambda ws, x: loop(ws, [x], [c], [w]), [(xi[r],) for r in range(W)])
            sim.check()
            for r in range(W):
                check(outs[r][0], xi, dtype, i)
        except Exception as e:  # noqa: BLE001
            prev = (shapes[i - 1], ctas[i - 1], warps[i - 1]) if i else None
            print(f"{tag}: call {i} {s} ctas={c} warps={w} after {prev}: FAIL {type(e).__name__}: {str(e)[:120]}",
                  flush=True)
            return
    print(f"{tag}: ok", flush=True)


for W, dtype in ((2, torch.float16), (4, torch.bfloat16)):
    rnd = random.Random(W * 17 + (dtype == torch.float16))
    shapes = sizes(W + 20 * (dtype == torch.float16))
    rnd.shuffle(shapes)
    shapes = shapes + shapes[::-1]           # exactly the draws of test_back_to_back_varying_sizes
    ctas = [rnd.choice([None, None, 1, 3, 8, 64, 128]) for _ in shapes]
    warps = [rnd.choice([None, 4, 8, 16]) for _ in shapes]
    n = len(shapes)
    t = f"W={W} {dtype}"
    trial(W, dtype, shapes, [None] * n, [None] * n, t + " sizes vary")
    trial(W, dtype, [(128, 5120)] * n, ctas, [None] * n, t + " grid varies")
    trial(W, dtype, [(128, 5120)] * n, [None] * n, warps, t + " warps vary")
    trial(W, dtype, [(128, 5120)] * n, [None] * n, [None] * n, t + " nothing varies")
    trial(W, dtype, shapes, ctas, warps, t + " all vary")
    one_by_one(W, dtype, shapes, ctas, warps, t + " one by one")
