"""The cases of ``tdcompile bench``: rows (MLP, attention, E2E, inference), columns (eager,
inductor, async-TP, bound, tdist) and how one row is prepared for one column."""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tdcompile.engine import Engine
from tdcompile.generate import tdist_options
from tdcompile.timing import measure_values

COLUMNS = ("eager", "inductor", "async_tp", "bound", "tdist")
BASELINES = ("eager", "inductor", "async_tp")
HEADERS = {"eager": "eager TP", "inductor": "inductor", "async_tp": "async-TP", "bound": "bound", "tdist": "tdist",
           "inductor_again": "inductor again"}
NOISE = "inductor_again"
"""Opt-in column: plain Inductor a second time (its own ``torch.compile`` call, which dynamo may serve
from the first one's cache), timed beside the first (METHOD: "time the same version twice");
``inductor / again`` in the table is the spread the same code shows in this run, against which a
tdist ratio near 1 (e.g. a row where nothing was fused) is read."""


@dataclass
class Row:
    group: str          # mlp | attn | e2e | infer
    name: str
    batch: int          # sequences (MLP: 1)
    seq: int            # tokens per sequence in this call (1 = decode; MLP: M)
    ctx: int = 0        # tokens already in the cache (decode)
    lm_head: bool = False
    steps: int = 0      # decode steps (infer)
    max_seq: int = 0    # cache length (e2e / infer)

    @property
    def decode(self) -> bool:
        return self.seq == 1


def rows_for(args, large: int) -> list[Row]:
    c, n = args.ctx, args.steps
    if args.quick:
        return [Row("mlp", "MLP M=16", 1, 16), Row("attn", f"attn decode bsz=4 ctx={c}", 4, 1, c),
                Row("e2e", f"E2E prefill 2x{c} +lm_head", 2, c, lm_head=True, max_seq=c),
                Row("e2e", "E2E decode bsz=4 +lm_head", 4, 1, c, lm_head=True, max_seq=c + n),
                Row("infer", f"inference 4x{c} + {n} steps", 4, c, lm_head=True, steps=n, max_seq=c + n)]
    rows = [Row("mlp", "MLP M=128", 1, 128), Row("mlp", "MLP M=4096", 1, 4096),
            Row("attn", f"attn prefill bsz=1 ctx={c}", 1, c), Row("attn", f"attn prefill bsz=32 ctx={c}", 32, c),
            Row("attn", f"attn decode bsz=128 ctx={c}", 128, 1, c),
            Row("attn", f"attn decode bsz={large} ctx={c}", large, 1, c)]
    for head in (False, True):
        tag = " +lm_head" if head else ""
        rows += [Row("e2e", f"E2E prefill 1x{c}{tag}", 1, c, lm_head=head, max_seq=c),
                 Row("e2e", f"E2E prefill 32x{c}{tag}", 32, c, lm_head=head, max_seq=c),
                 Row("e2e", f"E2E decode bsz={large}{tag}", large, 1, c, lm_head=head, max_seq=c + 1),
                 Row("e2e", f"E2E decode bsz=128{tag}", 128, 1, c, lm_head=head, max_seq=c + n)]
    # shares the Engine (and the decode graph) of the row above
    return rows + [Row("infer", f"inference 128x{c} + {n} steps", 128, c, lm_head=True, steps=n, max_seq=c + n)]


def large_batch(args, config, device, world: int, copies: int = 1) -> int:
    """Largest decode batch (<= 4096) whose KV cache (ctx + 1) and activations, ``copies`` times
    (one per interleaved column), fit next to the model already on the device; the same on every rank."""
    if args.large_batch or device.type != "cuda":
        return args.large_batch or 8
    free, _ = torch.cuda.mem_get_info(device)
    kv = 2 * config.num_hidden_layers * (args.ctx + 1) * max(1, config.num_key_value_heads // world) \
        * config.head_dim * 2                                                   # bytes per sequence
    act = 2 * (4 * config.hidden_size + 3 * config.intermediate_size // world + 2 * config.vocab_size)
    best = next((b for b in (4096, 2048, 1024, 512, 256) if copies * b * (kv + act) < 0.7 * free), 128)
    t = torch.tensor([best], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())



def compiler(column: str, args):
    """(backend, options) of a column for torch.compile / Engine."""
    if column == "eager":
        return "eager", None
    if column == "tdist":
        return "tdist", tdist_options(args)
    if column == "bound":   # every collective -> a no-op of the same shape: timing only
        return "tdist", {**tdist_options(args), "strategy": "bound"}
    if column == "tdist:sp":          # the sequence-parallel form forced, every match decided as tdist's
        return "tdist", {**tdist_options(args), "sequence_parallel": "always"}
    if column.startswith("tdist:margin"):   # e.g. "tdist:margin5": auto with a 5% margin (Options.margin)
        return "tdist", {**tdist_options(args), "margin": float(column[len("tdist:margin"):]) / 100}
    if column.startswith("tdist:"):   # one strategy forced, e.g. "tdist:sequence_parallel"
        return "tdist", {**tdist_options(args), "strategy": column.split(":", 1)[1]}
    if column == "async_tp":
        return "inductor", {"_micro_pipeline_tp": True}
    return "inductor", None         # inductor and inductor_again (NOISE)


def plan_for(column: str, row: Row) -> str:
    """HF plan for every column but async TP: sequence parallel where S can be sharded, plain
    Megatron TP (``torch``) for S=1 decode and the inference loop (whose decode is S=1)."""
    if column != "async_tp":
        return "hf"
    return "torch" if row.decode or row.group == "infer" else "torch_sp"


def prepare_row(row: Row, column: str, model, args, ctx: dict):
    """``(fn, rewind, graph)`` timing ``row`` under ``column`` (compiled lazily on first call)."""
    backend, options = compiler(column, args)
    device, world, rank = ctx["device"], ctx["world"], ctx["rank"]
    gpu, cfg = device.type == "cuda", model.config
    gen = torch.Generator().manual_seed(args.seed)
    sp = plan_for(column, row) == "torch_sp"  # inputs are this rank's sequence chunk
    comp = (lambda f: f) if backend == "eager" else \
        (lambda f: torch.compile(f, backend=backend, options=options, fullgraph=True, dynamic=False))
    if row.group in ("mlp", "attn"):
        x = torch.randn(row.batch, row.seq, cfg.hidden_size, generator=gen).to(device, ctx["dtype"])  # [B, S, H]
        x = x.chunk(world, dim=1)[rank].contiguous() if sp else x                                   # [B, S/w, H]
    if row.group == "mlp":
        mlp = comp(model.model.layers[0].mlp)
        return (lambda: mlp(x)), None, gpu
    if row.group == "attn":
        from transformers import StaticCache

        attn, rot = model.model.layers[0].self_attn, model.model.rotary_emb
        pos = torch.arange(row.ctx, row.ctx + row.seq, device=device).expand(row.batch, -1)       # [B, S]
        cache = None
        if row.decode:  # layer 0 of a cache holding ctx tokens; slot ctx takes the new one
            cache = StaticCache(config=cfg, max_cache_len=row.ctx + 1)
            k = attn.k_proj.weight
            k = k.to_local() if hasattr(k, "to_local") else k                                       # [kv*D, H]
            cache.early_initialization(row.batch, k.shape[0] // cfg.head_dim, cfg.head_dim, k.dtype, device)

        def step(x, pos):
            return attn(hidden_states=x, position_embeddings=rot(x, pos), attention_mask=None,
                        past_key_values=cache)[0]
        step = comp(step)
        rewind = (lambda: cache.layers[0].cumulative_length.fill_(row.ctx)) if cache is not None else None
        return (lambda: step(x, pos)), rewind, gpu

    engines = ctx.setdefault("engines", {})
    key = (column, row.lm_head, row.max_seq, id(model))
    if key not in engines:
        for k in [k for k in engines if k[1:] != key[1:] or k[0] == column]:   # one engine config at a time
            del engines[k]
        gc.collect()
        engines[key] = Engine(model, backend, options, max_batch=1 << 16, max_seq=row.max_seq, lm_head=row.lm_head)
    eng: Engine = engines[key]
    ids = torch.randint(0, cfg.vocab_size, (row.batch, row.seq), generator=gen).to(device)          # [B, S]
    eng.cache(row.batch)
    if not row.decode:
        return (lambda: eng.prefill(ids)), (lambda: eng.seek(row.batch, 0)), False
    eng.seek(row.batch, row.ctx)
    if row.batch not in eng._ready:
        eng.capture(row.batch)  # compiled, and captured in a CUDA graph on GPU
    return (lambda: eng.decode(ids)), (lambda: eng.seek(row.batch, row.ctx)), False


def run_infer(row: Row, column: str, model, args, ctx: dict) -> float:
    """The inference row: prefill + ``row.steps`` decode steps, end to end."""
    backend, options = compiler(column, args)
    eng = Engine(model, backend, options, max_batch=row.batch, max_seq=row.max_seq, lm_head=True)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (row.batch, row.seq), generator=gen).to(ctx["device"])
    eng.generate(ids, row.steps + 1)  # compile + capture
    runs = [eng.generate(ids, row.steps + 1) for _ in range(args.infer_runs)]
    ctx["infer"][column] = runs[-1].summary()
    return measure_values([r.prefill_ms + r.decode_ms for r in runs], ctx["device"])


def free_model(ctx: dict) -> None:
    ctx.pop("engines", None)
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
