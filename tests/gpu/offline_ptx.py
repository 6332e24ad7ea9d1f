"""Offline (no GPU) sm_90 PTX of a Triton kernel, for the tests that check what a kernel compiles to."""
import re


def ptx(fn, sig: dict, const: dict, num_warps: int, aligned: bool = True) -> str:
    """PTX of ``fn`` for argument types ``sig`` and constexprs ``const``; with ``aligned`` every
    pointer argument is declared 16-byte aligned (as Triton specialises aligned tensors)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v.startswith("*")} if aligned else {}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


def global_accesses(p: str) -> list:
    """The global loads and stores of PTX ``p`` (one stripped line each)."""
    return [ln.strip() for ln in p.splitlines() if re.search(r"\b(ld|st)(\.volatile)?\.global", ln)]
