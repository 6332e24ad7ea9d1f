"""Inference engine for the unmodified HF Qwen3: prefill + decode with a ``StaticCache``.

One code path measures every backend: ``"eager"`` (the TP model as is), ``"inductor"`` and
``"tdist"`` (``torch.compile(fullgraph=True, dynamic=False)`` of the same forward). On CUDA
the decode step is captured in a CUDA graph once compiled (gpt-fast style: static input
ids, static logits, replay); on CPU it is called directly.

Positions come from the cache (``StaticLayer.cumulative_length``, a device tensor), so a
captured step needs no host input except the token ids. Prompts of one batch share a
length (no padding).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tdcompile.config import cuda_graphed

BACKENDS = ("eager", "inductor", "tdist")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row of ``logits`` [B, V] -> [B]: greedy if ``temperature <= 0``, else top-p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)          # [B, V]
    sorted_p, idx = probs.sort(dim=-1, descending=True)                   # [B, V], [B, V]
    drop = (sorted_p.cumsum(dim=-1) - sorted_p) > top_p                   # mass before a token already >= p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)          # [B, 1] (renormalizes)
    return idx.gather(-1, choice).squeeze(-1)                             # [B]


def rank_device() -> torch.device:
    """This rank's device: its GPU under NCCL (or with no process group on a GPU machine), else CPU."""
    import os

    import torch.distributed as dist

    if not torch.cuda.is_available() or (dist.is_initialized() and dist.get_backend() != "nccl"):
        return torch.device("cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    torch.cuda.set_device(dev)
    return dev


def local_device(model) -> torch.device:
    p = next(model.parameters())
    return p.to_local().device if hasattr(p, "to_local") else p.device


class Timer:
    """Wall time of GPU work with CUDA events, of CPU work with perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3


class Graphed:
    """``fn(*static_inputs)`` captured in a CUDA graph: ``run(*inputs)`` copies the inputs into
    the static buffers, replays and returns the static output. ``reset()`` runs after every
    warm-up call (to undo state the step mutates, e.g. cache positions)."""

    def __init__(self, fn: Callable, *inputs: torch.Tensor, reset: Optional[Callable] = None, warmup: int = 3,
                 pool=None):
        self.inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]  # others: as is
        reset = reset or (lambda: None)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), cuda_graphed():  # compile / autotune / NCCL warm-up off the
            for _ in range(warmup):                     # capture; tdist decides for a graphed replay
                fn(*self.inputs)
                reset()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn(*self.inputs)
        torch.cuda.synchronize()
        reset()

    def run(self, *inputs: torch.Tensor):
        for buf, x in zip(self.inputs, inputs):
            if isinstance(x, torch.Tensor) and buf.data_ptr() != x.data_ptr():
                buf.copy_(x)
        self.graph.replay()
        return self.out


@dataclass
class Generation:
    tokens: torch.Tensor            # [B, new] generated ids
    prefill_ms: float
    decode_ms: float                # all decode steps
    step_ms: list = field(default_factory=list)  # per decode step (forward + sampling)
    compile_s: float = 0.0          # compile + graph capture spent inside this call

    @property
    def tokens_per_s(self) -> float:
        b, n = self.tokens.shape
        return b * (n - 1) / (self.decode_ms / 1e3) if n > 1 and self.decode_ms > 0 else 0.0

    def summary(self) -> dict:
        steps = sorted(self.step_ms)
        med = steps[len(steps) // 2] if steps else 0.0
        return {"batch": self.tokens.shape[0], "new_tokens": self.tokens.shape[1],
                "prefill_ms": round(self.prefill_ms, 3), "decode_ms": round(self.decode_ms, 3),
                "step_ms_median": round(med, 4), "tokens_per_s": round(self.tokens_per_s, 1),
                "compile_s": round(self.compile_s, 2)}


class Engine:
    """``Engine(model, backend).generate(input_ids [B, S], max_new_tokens)``.

    ``lm_head=False`` makes the step return the final hidden states (benchmarks only)."""

    def __init__(self, model, backend: str = "eager", options: Optional[dict] = None, max_batch: int = 8,
                 max_seq: int = 256, cuda_graphs: bool = True, compile_prefill: bool = True,
                 lm_head: bool = True):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        import tdcompile  # noqa: F401  (registers the tdist backend)
        from transformers import StaticCache

        self.model, self.backend, self.lm_head = model, backend, lm_head
        self.max_batch, self.max_seq = max_batch, max_seq
        self.device = local_device(model)
        self.graphs_on = cuda_graphs and self.device.type == "cuda"
        self.timer = Timer(self.device)
        self._new_cache = lambda: StaticCache(config=model.config, max_cache_len=max_seq)
        self.caches: dict[int, object] = {}
        self.graphs: dict[int, Graphed] = {}
        self._ready: set = set()  # batch sizes / prompt shapes already compiled (and captured)
        # One code object serves every Engine, shape and backend: never fall back to eager.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 1024)
        if backend == "eager":
            self._step = self._forward
        else:
            self._step = torch.compile(self._forward, backend=backend, options=options or None,
                                       fullgraph=True, dynamic=False)
        self._prefill = self._step if compile_prefill else self._forward

    def _forward(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        if self.lm_head:
            out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1]                                         # [B, 1, V] -> [B, V]
        return self.model.model(input_ids=input_ids, past_key_values=cache, use_cache=True).last_hidden_state

    # ---------------------------------------------------------------- cache
    def cache(self, batch: int):
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} > max_batch {self.max_batch}")
        if batch not in self.caches:  # allocated up front: a compiled prefill must not lazily init it
            cache, cfg = self._new_cache(), self.model.config
            k = self.model.model.layers[0].self_attn.k_proj.weight
            k = k.to_local() if hasattr(k, "to_local") else k                    # [local kv heads * D, H]
            cache.early_initialization(batch, k.shape[0] // cfg.head_dim, cfg.head_dim, k.dtype, self.device)
            self.caches[batch] = cache
        return self.caches[batch]

    def seek(self, batch: int, pos: int) -> None:
        """Set the cache of ``batch`` to ``pos`` tokens (benchmarks rewind with this)."""
        for layer in self.cache(batch).layers:
            layer.cumulative_length.fill_(pos)

    def position(self, batch: int) -> int:
        return int(self.cache(batch).layers[0].cumulative_length)

    # ---------------------------------------------------------------- steps
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, S] from the cache's current position; logits of the last one [B, V]."""
        b, s = input_ids.shape
        if self.position(b) + s > self.max_seq:
            raise ValueError(f"{self.position(b)} + {s} tokens > max_seq {self.max_seq}")
        return self._prefill(input_ids, self.cache(b))

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One token per row [B, 1] -> logits [B, V] (a CUDA-graph replay on GPU)."""
        b = input_ids.shape[0]
        if not self.graphs_on:
            return self._step(input_ids, self.cache(b))
        if b not in self.graphs:
            self.capture(b)
        return self.graphs[b].run(input_ids)

    @torch.no_grad()
    def capture(self, batch: int) -> float:
        """Compile and (on CUDA) capture the decode step of ``batch`` at the current position;
        the cache is left where it was. Needs the cache initialized (a prefill ran). Seconds."""
        t0, cache = time.perf_counter(), self.cache(batch)
        lens = [layer.cumulative_length for layer in cache.layers]
        saved = [x.clone() for x in lens]
        restore = lambda: torch._foreach_copy_(lens, saved)  # noqa: E731
        ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)   # [B, 1]
        if self.graphs_on:
            self.graphs[batch] = Graphed(self._step, ids, cache, reset=restore)
        else:
            self._step(ids, cache)
            restore()
        self._ready.add(batch)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> Generation:
        """Greedy (``temperature=0``) or top-p sampling; every rank draws the same tokens."""
        if not self.lm_head:
            raise ValueError("generate needs lm_head=True")
        b, s = input_ids.shape
        if s + max_new_tokens - 1 > self.max_seq:  # the last token is sampled, never cached
            raise ValueError(f"{s} + {max_new_tokens} - 1 tokens > max_seq {self.max_seq}")
        input_ids = input_ids.to(self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        cache, compile_s = self.cache(b), 0.0
        cache.reset()
        if self._prefill is self._step and (b, s) not in self._ready:
            t0 = time.perf_counter()  # compile the prefill shape outside the timed region
            self.prefill(input_ids)
            cache.reset()
            self._ready.add((b, s))
            compile_s += time.perf_counter() - t0

        t0 = self.timer.mark()
        tok = sample(self.prefill(input_ids), temperature, top_p, gen)      # [B]
        t1 = self.timer.mark()
        out, steps = [tok], []
        if max_new_tokens > 1 and b not in self._ready:
            compile_s += self.capture(b)  # the cache is where the prefill left it
        marks = [self.timer.mark()]
        for _ in range(max_new_tokens - 1):
            tok = sample(self.decode(tok[:, None]), temperature, top_p, gen)  # [B, 1] -> [B]
            out.append(tok)
            marks.append(self.timer.mark())
        tokens = torch.stack(out, dim=1)                                      # [B, new]
        prefill_ms = self.timer.ms(t0, t1)
        steps = [self.timer.ms(a, b_) for a, b_ in zip(marks, marks[1:])]
        return Generation(tokens.cpu(), prefill_ms, sum(steps), steps, compile_s)
