"""Random tensor-parallel toy programs for the graph fuzzer (tests/test_fuzz.py).

``make_case(seed)`` turns one integer into a whole case: a small ``nn.Module`` whose
``forward`` is generated Python source (chains of ``nn.Linear`` with or without bias,
pointwise ops, an RMS norm, reshapes, 2-D / 3-D activations, functional collectives on one
or two process groups, shared inputs, matmuls with several users), its input shapes
(odd M and K, M < world size included), a strategy and dynamic on/off. The same seed gives
the same case on every rank and in every process, so a failing seed replays exactly
(``TDIST_FUZZ_SEED=<seed>``; ``python tests/fuzz_programs.py <seed>`` prints the program).

Programs follow the tensor-parallel placement rule of real TP code: every value is either
replicated (equal on all ranks: replicated inputs, outputs of all_reduce / all_gather) or
rank-local (per-rank shards, outputs of sharded weights or reduce_scatter), and a binary op
only combines values of the same kind. That rule is what the sequence-parallel rewrite may
assume (it slices replicated operands locally); within it, every strategy must compute
what eager computes.
"""
from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn

WORLD = 2
STRATEGIES = ("auto", "fused", "unfused", "sequence_parallel")
GROUPS: list = []            # the process groups programs use (set by the worker: WORLD and a second one)
MAX_ROWS = 48                # cap on rows (all_gather multiplies them)


@dataclass
class Value:
    name: str
    shape: tuple
    replicated: bool         # equal on every rank


@dataclass
class Case:
    seed: int
    strategy: str
    dynamic: bool
    profile: str | None      # cost-model profile for strategy "auto" (None: CPU default, nothing fused)
    inputs: list             # [(name, shape, replicated)]
    linears: dict = field(default_factory=dict)   # name -> (in, out, bias, replicated weight)
    vectors: dict = field(default_factory=dict)   # name -> width (replicated [C] parameters)
    lines: list = field(default_factory=list)     # body of forward
    outputs: list = field(default_factory=list)

    @property
    def options(self) -> dict:
        return {"strategy": self.strategy, **({"profile": self.profile} if self.profile else {})}

    @property
    def source(self) -> str:
        args = ", ".join(name for name, _, _ in self.inputs)
        body = "\n".join("    " + ln for ln in self.lines)
        return f"def forward(self, {args}):\n{body}\n    return ({', '.join(self.outputs)},)\n"

    def describe(self) -> str:
        ins = ", ".join(f"{n}{list(s)}{'' if rep else ' rank-local'}" for n, s, rep in self.inputs)
        return (f"seed={self.seed} strategy={self.strategy} dynamic={self.dynamic} profile={self.profile}\n"
                f"inputs: {ins}\n{self.source}")


class _Builder:
    """Appends ops to a case, tracking each value's shape and placement."""

    def __init__(self, case: Case, rng: random.Random):
        self.case, self.rng, self.values, self.n = case, rng, [], 0

    def new(self, shape, replicated, expr, note="") -> Value:
        v = Value(f"v{self.n}", tuple(shape), replicated)
        self.n += 1
        self.case.lines.append(f"{v.name} = {expr}  # {list(shape)}{' ' + note if note else ''}")
        self.values.append(v)
        return v

    def pick(self, ok=lambda v: True) -> Value | None:
        """A value satisfying ``ok``, most often the newest (chains), sometimes an older one
        (several users of one value, shared inputs)."""
        cands = [v for v in self.values if ok(v)]
        if not cands:
            return None
        return cands[-1] if self.rng.random() < 0.6 else self.rng.choice(cands)

    def width(self) -> int:
        return self.rng.choice([1, 2, 3, 4, 5, 6, 8, 8, 12, 16])

    def group(self) -> str:
        return f"G[{1 if self.rng.random() < 0.2 else 0}]"

    # -- ops -------------------------------------------------------------------------------
    def linear(self, v: Value, n=None, replicated_weight=None) -> Value:
        name = f"l{len(self.case.linears)}"
        n = n or self.width()
        bias = self.rng.random() < 0.5
        rep_w = self.rng.random() < 0.2 if replicated_weight is None else replicated_weight
        self.case.linears[name] = (v.shape[-1], n, bias, rep_w)
        return self.new((*v.shape[:-1], n), v.replicated and rep_w, f"self.lin.{name}({v.name})",
                        "linear" + (" +bias" if bias else ""))

    def pointwise(self, v: Value) -> Value:
        expr = self.rng.choice(["torch.relu({})", "F.silu({})", "F.gelu({})", "torch.tanh({})", "{} * 0.5",
                                "-{}", "torch.sigmoid({}) * {}"])
        return self.new(v.shape, v.replicated, expr.format(v.name, v.name))

    def binary(self, v: Value) -> Value:
        other = self.pick(lambda u: u is not v and u.shape == v.shape and u.replicated == v.replicated)
        if other is None or self.rng.random() < 0.3:   # a replicated [C] parameter, broadcast over rows
            name = f"p{len(self.case.vectors)}"
            self.case.vectors[name] = v.shape[-1]
            return self.new(v.shape, v.replicated, f"{v.name} * self.vec.{name}")
        op = self.rng.choice(["+", "*", "-"])
        return self.new(v.shape, v.replicated, f"{v.name} {op} {other.name}")

    def rms_norm(self, v: Value) -> Value:
        return self.new(v.shape, v.replicated, f"{v.name} * torch.rsqrt({v.name}.pow(2).mean(-1, keepdim=True) + 1e-6)",
                        "rms norm (row-local)")

    def reshape(self, v: Value) -> Value | None:
        *rows, c = v.shape
        if len(rows) == 2 and self.rng.random() < 0.7:
            return self.new((rows[0] * rows[1], c), v.replicated, f"{v.name}.reshape(-1, {c})", "3-D -> 2-D")
        if len(rows) == 2 and rows[0] > 1 and rows[1] > 1:  # a row permutation
            return self.new((rows[1], rows[0], c), v.replicated, f"{v.name}.transpose(0, 1).contiguous()",
                            "[B, S, C] -> [S, B, C]")
        if len(rows) == 1:
            m = rows[0]
            divs = [b for b in range(2, m) if m % b == 0]
            if divs and self.rng.random() < 0.7:
                b = self.rng.choice(divs)
                return self.new((b, m // b, c), v.replicated, f"{v.name}.reshape({b}, -1, {c})", "2-D -> 3-D")
        lead = "".join(f"{d}, " for d in rows[:-1])       # reshapes that regroup rows: not row-local
        if rows[-1] % 2 == 0 and self.rng.random() < 0.5:
            return self.new((*rows[:-1], rows[-1] // 2, 2 * c), v.replicated, f"{v.name}.reshape({lead}-1, {2 * c})",
                            "rows halved, last dim doubled")
        if c % 2 == 0:
            return self.new((*rows[:-1], rows[-1] * 2, c // 2), v.replicated, f"{v.name}.reshape({lead}-1, {c // 2})",
                            "last dim halved")
        return None

    def all_reduce(self, v: Value) -> Value:
        return self.new(v.shape, True, f"funcol.all_reduce({v.name}, 'sum', {self.group()})", "all_reduce")

    def all_gather(self, v: Value, dim=None) -> Value | None:
        if dim is None:
            dim = self.rng.choice([0] * 3 + list(range(len(v.shape))))
        shape = list(v.shape)
        shape[dim] *= WORLD
        if shape[0] * (shape[1] if len(shape) == 3 else 1) > MAX_ROWS:
            return None
        return self.new(shape, True, f"funcol.all_gather_single({v.name}, {dim}, {self.group()})",
                        f"all_gather on dim {dim}")

    def reduce_scatter(self, v: Value, dim=None) -> Value | None:
        dims = [d for d, s in enumerate(v.shape) if s % WORLD == 0]
        if dim is None:
            if not dims:
                return None
            dim = 0 if 0 in dims and self.rng.random() < 0.6 else self.rng.choice(dims)
        if v.shape[dim] % WORLD:
            return None
        shape = list(v.shape)
        shape[dim] //= WORLD
        return self.new(shape, False, f"funcol.reduce_scatter_single({v.name}, 'sum', {dim}, {self.group()})",
                        f"reduce_scatter on dim {dim}")

    # -- motifs: the shapes tensor-parallel code takes -------------------------------------
    def row_parallel(self, v: Value) -> Value:
        """column-parallel linear -> activation -> row-parallel linear -> all_reduce."""
        h = self.pointwise(self.linear(v, replicated_weight=False))
        return self.all_reduce(self.linear(h, n=v.shape[-1], replicated_weight=False))

    def sequence_parallel(self, v: Value) -> Value | None:
        """all_gather -> linear(s) (maybe nothing between them) -> linear -> reduce_scatter."""
        dim = 0 if len(v.shape) == 2 or self.rng.random() < 0.5 else 1
        g = self.all_gather(v, dim)
        if g is None:
            return None
        h = self.linear(g, replicated_weight=False)
        if self.rng.random() < 0.5:
            h = self.pointwise(h)
        if self.rng.random() < 0.3:
            self.linear(g, replicated_weight=False)           # a second weight on the same gather
        return self.reduce_scatter(self.linear(h, n=v.shape[-1], replicated_weight=False), dim)

    def decoder_layer(self, v: Value) -> Value:
        """HF-style layer on a replicated residual: h + all_reduce(row_parallel(rms_norm(h)))."""
        if not v.replicated:
            v = self.all_reduce(v)
        out = self.row_parallel(self.rms_norm(v))
        return self.new(v.shape, True, f"{v.name} + {out.name}", "residual add")

    def all_reduce_then_linear(self, v: Value) -> Value:
        """all_reduce -> pointwise -> one linear -> all_reduce."""
        h = self.pointwise(self.all_reduce(v))
        return self.all_reduce(self.linear(h, replicated_weight=False))


OPS = {   # op -> weight
    "linear": 6, "pointwise": 3, "binary": 3, "rms_norm": 2, "reshape": 3, "all_reduce": 3, "all_gather": 2,
    "reduce_scatter": 2, "row_parallel": 2, "sequence_parallel": 2, "all_reduce_then_linear": 1, "decoder_layer": 2,
}
COLLECTIVE_OPS = ("all_reduce", "all_gather_single", "reduce_scatter_single")


def make_case(seed: int) -> Case:
    rng = random.Random(seed)
    strategy = rng.choice(STRATEGIES)
    profile = rng.choice([None, "h100", "h200"]) if strategy == "auto" else None
    case = Case(seed=seed, strategy=strategy, dynamic=rng.random() < 0.3, profile=profile, inputs=[])
    b = _Builder(case, rng)
    k = b.width()
    if rng.random() < 0.5:
        rows = (rng.choice([1, 2, 3, 4, 6, 7, 8, 9, 12, 16]),)                    # [M, K]; M < world, odd M
    else:
        rows = (rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4, 5, 8]))            # [B, S, K]
    for i in range(1 if rng.random() < 0.6 else 2):                              # a second input: shared rows
        rep = rng.random() < 0.5
        case.inputs.append((f"x{i}", (*rows, k), rep))
        b.values.append(Value(f"x{i}", (*rows, k), rep))
    names, weights = zip(*OPS.items())
    for _ in range(rng.randint(1, 7)):
        op = rng.choices(names, weights)[0]
        v = b.pick()
        getattr(b, op)(v)
    if not any(c in ln for ln in case.lines for c in COLLECTIVE_OPS):
        b.all_reduce(b.values[-1])
    # outputs: every value nothing else reads (no dead collectives), the newest first
    produced = [v.name for v in b.values if v.name.startswith("v")]
    read = {tok for ln in case.lines for tok in re.findall(r"\bv\d+\b", ln.split("=", 1)[1])}
    case.outputs = [v for v in reversed(produced) if v not in read]
    return case


# ------------------------------------------------------------------------------- building
def _init(t: torch.Tensor, seed: int, scale: float) -> None:
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * scale)


def build(case: Case, rank: int) -> tuple[nn.Module, tuple]:
    """The case's module and inputs on ``rank``: replicated tensors equal on every rank,
    rank-local ones (sharded weights, rank-local inputs) different per rank."""
    import torch.distributed._functional_collectives as funcol
    import torch.nn.functional as F

    def seed_of(i, replicated):
        return case.seed * 1000 + i * 10 + (0 if replicated else rank + 1)

    namespace = {"torch": torch, "F": F, "funcol": funcol, "G": GROUPS}
    exec(compile(case.source, f"<fuzz case {case.seed}>", "exec"), namespace)
    module_cls = type(f"FuzzCase{case.seed}", (nn.Module,), {"forward": namespace["forward"]})
    m = module_cls()
    m.lin, m.vec = nn.ModuleDict(), nn.ParameterDict()
    for i, (name, (fin, fout, bias, rep)) in enumerate(case.linears.items()):
        lin = nn.Linear(fin, fout, bias=bias)
        _init(lin.weight, seed_of(i, rep), fin ** -0.5)
        if bias:
            _init(lin.bias, seed_of(i + 500, rep), 0.1)
        m.lin[name] = lin
    for i, (name, width) in enumerate(case.vectors.items()):
        p = nn.Parameter(torch.empty(width))
        _init(p, seed_of(i + 800, True), 1.0)
        m.vec[name] = p
    inputs = []
    for i, (_, shape, rep) in enumerate(case.inputs):
        x = torch.empty(shape)
        _init(x, seed_of(i + 900, rep), 1.0)
        inputs.append(x)
    return m.eval(), tuple(inputs)


if __name__ == "__main__":   # python tests/fuzz_programs.py SEED: print the program
    print(make_case(int(sys.argv[1])).describe())
