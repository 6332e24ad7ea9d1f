"""Diagnose the simulated AG-GEMM barrier (host timeline + direct barrier test)."""
import os
import sys
import time

os.environ["TDCOMPILE_DEBUG_HOST"] = "1"
sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

from tdcompile.kernels import all_gather_gemm as agm  # noqa: E402
from tdcompile.kernels import signals as sig  # noqa: E402
from tdcompile.kernels.symm import MAX_WORLD, PAD_SLOTS, SimWorld  # noqa: E402

sim = SimWorld(2, timeout_s=2)
stride = PAD_SLOTS * MAX_WORLD
for nw in (1, 4):
    def bar(ws):
        e = ws.bump_epoch("all_gather_gemm")
        agm._ag_barrier[(1,)](ws.pads.ptrs, 2 * stride, e, ws.err_addr, sig.error_code(2, ws.rank, 1), ws.rank,
                              ws.timeout_us, WORLD=2, num_warps=nw)
    t = time.perf_counter()
    sim.run(bar, [(), ()])
    torch.cuda.synchronize()
    print(f"direct barrier num_warps={nw}: {1e3 * (time.perf_counter() - t):.1f} ms err",
          [int(w.err[0]) for w in sim.ws], "pads", sim.allocs["pads"][0].view(torch.int32)[4096:4100].tolist(),
          sim.allocs["pads"][1].view(torch.int32)[4096:4100].tolist(), flush=True)
for w in sim.ws:
    w.err.zero_()
# reset AG epochs to equal values
for w in sim.ws:
    w.epoch.zero_()
for p in sim.allocs["pads"]:
    p.zero_()
torch.cuda.synchronize()
sh = [torch.randn(64, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
b = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
for it in range(3):
    t = time.perf_counter()
    outs = sim.run(lambda ws, s: agm.all_gather_gemm(ws, s, [b]), [(s,) for s in sh])
    torch.cuda.synchronize()
    print(f"AG call {it}: {1e3 * (time.perf_counter() - t):.1f} ms err", [int(w.err[0]) for w in sim.ws], flush=True)
    ref = torch.cat(sh).float() @ b.float()
    print("  max err", [(o[1][0].float() - ref).abs().max().item() for o in outs], flush=True)
