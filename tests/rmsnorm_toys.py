"""Harness and toy models of the ``all_reduce -> + residual -> RMSNorm`` tests
(``tests/test_all_reduce_rmsnorm_*.py``; the fusion into ``tdist.all_reduce_rmsnorm``, issue 10, item 3).

The model goes through ``torch.compile`` -- Dynamo, AOT, Inductor's joint-graph and post-grad
passes -- and at Inductor's ``post_grad_custom_post_pass`` (where the tdist pass runs) ``normalize``
+ ``find_all_reduce_rmsnorm_matches`` run and the matches are rewritten (``compile_post_grad``). The
post-grad graph is then executed as it is, without Inductor's C++ code generation (seconds instead
of ~20 s per model); the full backend is exercised by the wiring tests.

Toy models: HF-shaped decoder-layer tails (``nn.Linear`` -> functional all_reduce -> ``residual + x``
-> HF's own ``Qwen3RMSNorm``), decoder stacks, and almost-RMSNorms that must stay unfused.
"""
from __future__ import annotations

import functools
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn as nn

import tdcompile  # noqa: F401  (registers torch.ops.tdist.*)
from tdcompile.passes.all_reduce_rmsnorm import find_all_reduce_rmsnorm_matches
from tdcompile.passes.gemm_all_reduce_rmsnorm import find_gemm_all_reduce_rmsnorm_matches
from tdcompile.passes.normalize import normalize

c10d = torch.ops._c10d_functional
W = 2
B, S, K, H = 2, 4, 16, 8          # activations [B, S, K] -> row-parallel linear -> [B, S, H]


# ============================================================================ harness
def _group() -> str:
    return dist.group.WORLD.group_name


def all_reduce(x, op="sum"):
    return c10d.wait_tensor(c10d.all_reduce(x, op, _group()))


def op_counts(graph) -> Counter:
    out = Counter()
    for n in graph.nodes:
        if n.op == "call_function":
            t = n.target
            name = str(t.overloadpacket) if isinstance(t, torch._ops.OpOverload) else t.__name__
            out[name.replace("_c10d_functional.", "c10d.")] += 1
    return out


def _describe(n) -> str:
    """``"op[i]"`` for ``getitem(tdist.all_reduce_rmsnorm(...), i)``, else the node's target."""
    import operator

    if isinstance(n, torch.fx.Node) and n.target is operator.getitem and n.args[0].target in (
            torch.ops.tdist.all_reduce_rmsnorm.default, torch.ops.tdist.gemm_all_reduce_rmsnorm.default):
        return f"op[{n.args[1]}]"
    return str(getattr(n, "target", n))


class _FindAndRewrite:
    """Stands where ``TdistPass`` stands (Inductor's post_grad_custom_post_pass)."""

    def __init__(self, rewrite: bool, impl: str, gemm: bool = False):
        self.rewrite, self.impl, self.gemm, self.graphs = rewrite, impl, gemm, []

    def __call__(self, graph):
        normalize(graph)
        before = op_counts(graph)
        matches = find_all_reduce_rmsnorm_matches(graph)
        if self.gemm:          # the GEMM -> all_reduce -> norm form where a GEMM feeds the all-reduce
            matches = find_gemm_all_reduce_rmsnorm_matches(matches)
        infos = [{"module": m.module, "source": m.source, "shape": m.mnk(), "eps": m.eps, "dtype": m.dtype,
                  "group": m.group_name, "world": m.world_size, "detail": m.describe()} for m in matches]
        if self.rewrite:
            for m in matches:
                m.replace_with(graph, impl=self.impl)
            graph.lint()
        self.graphs.append({"before": before, "after": op_counts(graph), "matches": infos,
                            "objs": matches, "code": graph.python_code("self").src,
                            "outputs": [_describe(a) for a in graph.output_node().args[0]]})

    def uuid(self):
        return None


def make_pass(rewrite, impl, gemm=False):
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class P(_FindAndRewrite, CustomGraphPass):
        pass
    return P(rewrite, impl, gemm)


def post_grad_backend(gm, example_inputs, *, cap):
    from functorch.compile import make_boxed_func
    from torch._inductor.compile_fx import _recursive_post_grad_passes, compile_fx

    def inner(g, inputs, **kw):   # Inductor's post-grad passes (ours among them), then run the ATen graph
        _recursive_post_grad_passes(g, is_inference=kw.get("is_inference", False))
        return make_boxed_func(g.forward)

    return compile_fx(gm, example_inputs, inner_compile=inner,
                      config_patches={"post_grad_custom_post_pass": cap, "force_disable_caches": True})


def compile_post_grad(model, *args, rewrite=True, impl="fused", gemm=False, **kwargs):
    """Returns (the pass record: one dict per graph, the compiled output); ``gemm``: match the
    ``gemm_all_reduce_rmsnorm`` form instead."""
    cap = make_pass(rewrite, impl, gemm)
    torch._dynamo.reset()
    fn = torch.compile(model, backend=functools.partial(post_grad_backend, cap=cap), fullgraph=True)
    with torch.no_grad():
        out = fn(*args, **kwargs)
    torch._dynamo.reset()
    return cap.graphs, out


# ============================================================================ toy models
class Qwen3RMSNorm(nn.Module):
    """A verbatim copy of transformers' ``Qwen3RMSNorm`` (= ``LlamaRMSNorm``; checked by
    ``test_toy_norm_is_a_verbatim_copy_of_hf``), so the gloo workers need not import transformers."""

    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RowParallelResidualNorm(nn.Module):
    """HF's decoder-layer tail: row-parallel linear -> all_reduce -> ``residual + x`` -> RMSNorm.
    Returns (normed, new residual) like the layer does."""

    def __init__(self, norm_cls=Qwen3RMSNorm, eps=1e-6, op="sum"):
        super().__init__()
        self.o_proj = nn.Linear(K, H, bias=False)
        self.norm = norm_cls(H, eps=eps)
        self.op = op
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x, residual):
        residual = residual + all_reduce(self.o_proj(x), self.op)
        return self.norm(residual), residual


class ReshapedReduce(RowParallelResidualNorm):
    """The reduce runs on the 2-D GEMM output and is reshaped after the wait."""

    def forward(self, x, residual):
        y = all_reduce(torch.mm(x.reshape(-1, K), self.o_proj.weight.t()))
        residual = residual + y.reshape(residual.shape)
        return self.norm(residual), residual


class NormOnFlattenedSum(RowParallelResidualNorm):
    """The norm reads the sum reshaped to 2-D; the residual stream stays 3-D."""

    def forward(self, x, residual):
        residual = residual + all_reduce(self.o_proj(x))
        return self.norm(residual.reshape(-1, H)), residual


class ToyDecoder(nn.Module):
    """``layers`` HF-shaped layers (input norm -> row-parallel "attention" -> + residual -> post norm
    -> row-parallel "MLP" -> + residual) and a final norm: 2 matches per layer, the residual of each
    feeding the next, the last one into the final norm (whose residual has no other user)."""

    def __init__(self, layers=2, norm_cls=Qwen3RMSNorm):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.input_layernorm, layer.post_attention_layernorm = norm_cls(H), norm_cls(H)
            layer.o_proj, layer.down_proj = nn.Linear(H, H, bias=False), nn.Linear(H, H, bias=False)
            self.layers.append(layer)
        self.norm = norm_cls(H)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, norm_cls):
                    m.weight.uniform_(0.5, 1.5)

    def forward(self, h):
        for layer in self.layers:
            h = h + all_reduce(layer.o_proj(layer.input_layernorm(h)))
            h = h + all_reduce(layer.down_proj(torch.relu(layer.post_attention_layernorm(h))))
        return self.norm(h)


def rms_parts(h, weight, eps=1e-6):
    """HF's RMSNorm written out, returning the variance as well (a user outside the pattern)."""
    dt = h.dtype
    h32 = h.to(torch.float32)
    var = h32.pow(2).mean(-1, keepdim=True)
    return weight * (h32 * torch.rsqrt(var + eps)).to(dt), var


class NormWithOtherUser(RowParallelResidualNorm):
    def forward(self, x, residual):
        residual = residual + all_reduce(self.o_proj(x))
        normed, var = rms_parts(residual, self.norm.weight)
        return normed, residual, var


class NormWithoutWeight(RowParallelResidualNorm):
    def forward(self, x, residual):
        residual = residual + all_reduce(self.o_proj(x))
        h = residual.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(residual.dtype), residual


class EpsOutsideSqrt(RowParallelResidualNorm):
    def forward(self, x, residual):
        residual = residual + all_reduce(self.o_proj(x))
        h = residual.to(torch.float32)
        return self.norm.weight * (h / (h.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)).to(residual.dtype), residual


class BiasAfterReduce(RowParallelResidualNorm):
    """HF's row-parallel linear with bias adds the bias after the reduce: not a residual add."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(H))

    def forward(self, x, residual):
        y = all_reduce(self.o_proj(x)) + self.bias
        residual = residual + y
        return self.norm(residual), residual


class Fp32ResidualBf16Reduce(RowParallelResidualNorm):
    def forward(self, x, residual):   # residual fp32, reduce bf16: the add promotes
        residual = residual + all_reduce(nn.functional.linear(x.bfloat16(), self.o_proj.weight.bfloat16()))
        return self.norm(residual), residual


class GemmOutputUsedTwice(RowParallelResidualNorm):
    """The GEMM's output also leaves the graph: the GEMM must stay, so only the norm fusion applies."""

    def forward(self, x, residual):
        y = self.o_proj(x)
        residual = residual + all_reduce(y)
        return self.norm(residual), residual, y


def toy_inputs(dtype=torch.float32, seed=0, rank=0):
    g = torch.Generator().manual_seed(seed + 1000 * (rank + 1))   # per-rank shard of the activation
    gr = torch.Generator().manual_seed(seed)                      # replicated residual
    return torch.randn(B, S, K, generator=g).to(dtype), torch.randn(B, S, H, generator=gr).to(dtype)


def toy_model(cls=RowParallelResidualNorm, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**kw).to(dtype).eval()
