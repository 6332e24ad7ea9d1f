"""``tdcompile bench --check``: last-position softmax of tdist, eager TP and a single-device
reference after a prefill and one decode step."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tdcompile.bench_cases import free_model
from tdcompile.engine import Engine
from tdcompile.generate import tdist_options
from tdcompile.models import build_sharded

def check(args, config, dtype, device, rank: int, world: int) -> dict:
    """Last-position fp32 softmax after a prefill and after one decode step: tdist and eager TP
    against each other and against a single-device (unsharded) reference on rank 0."""
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (args.check_batch, args.ctx), generator=gen).to(device)  # [B, S]

    def run(model, backend, options=None):
        eng = Engine(model, backend, options, max_batch=args.check_batch, max_seq=args.ctx + 1,
                     cuda_graphs=args.cuda_graphs)
        with torch.no_grad():
            eng.cache(ids.shape[0]).reset()
            first = eng.prefill(ids).float()                        # [B, V]
            nxt = ctx_token if ctx_token is not None else first.argmax(-1)
            return first.cpu(), eng.decode(nxt[:, None]).float().cpu(), nxt

    ctx_token = None
    model = build_sharded(config, "hf", dtype=dtype, device=device, seed=args.seed)
    out = {"eager": run(model, "eager")}
    ctx_token = out["eager"][2]
    out["tdist"] = run(model, "tdist", tdist_options(args))
    del model
    free_model({})
    need = sum(p.numel() for p in _meta_params(config)) * dtype.itemsize * 1.3
    fits = device.type != "cuda" or torch.cuda.mem_get_info(device)[0] > need
    if rank == 0 and fits:
        ref = build_sharded(config, "none", dtype=dtype, device=device, seed=args.seed, progress=False)
        out["reference"] = run(ref, "eager")
        del ref
        free_model({})
    if world > 1:
        dist.barrier()
    res = {"layers": config.num_hidden_layers, "batch": args.check_batch, "ctx": args.ctx, "world": world,
           "dtype": str(dtype).split(".")[-1], "reference": "single device" if "reference" in out else
           "skipped: the unsharded model does not fit", "pairs": {}, "passed": True}
    names = [n for n in ("tdist", "eager", "reference") if n in out]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for step, j in (("prefill", 0), ("decode", 1)):
                pa, pb = out[a][j].softmax(-1), out[b][j].softmax(-1)                 # [B, V] fp32
                ok = bool(torch.allclose(pa, pb, atol=2e-2, rtol=2e-2))
                res["pairs"][f"{a} vs {b} ({step})"] = {
                    "allclose_2e-2": ok, "max_abs_prob_diff": float((pa - pb).abs().max()),
                    "max_abs_logit_diff": float((out[a][j] - out[b][j]).abs().max()),
                    "argmax_agree": float((out[a][j].argmax(-1) == out[b][j].argmax(-1)).float().mean())}
                res["passed"] &= ok
    if world > 1:  # rank 0 alone saw the reference: every rank returns its verdict
        box = [res]
        dist.broadcast_object_list(box, src=0)
        res = box[0]
    return res


def _meta_params(config):
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        return list(Qwen3ForCausalLM(config).parameters())
