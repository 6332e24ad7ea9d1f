"""Compile every fused kernel for sm_90 without a GPU (Triton's bundled ptxas).

Usage: python scripts/compile_check.py   (needs triton; no CUDA device)"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, ".")
from tdcompile.kernels import all_gather_gemm as ag, all_reduce as ar, gemm_all_reduce as gar  # noqa: E402
from tdcompile.kernels import gemm_reduce_scatter as grs  # noqa: E402
from tdcompile.kernels.tiles import gemm_configs  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


SPECIALIZED_ONE = ("stride_ak", "stride_bn")          # unit strides become constants at run time
SPECIALIZED_16 = ("N", "K", "stride_am", "stride_bk", "stride_cm", "pad_off")


def compile_one(fn, sig, consts, **opts):
    """Mirror Triton's run-time specialization: 16-aligned pointers, ints divisible by 16."""
    consts = dict(consts)
    for k in SPECIALIZED_ONE:
        if k in sig:
            consts[k] = 1
    full = {**sig, **{k: "constexpr" for k in consts}}
    names = fn.arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if k not in consts and (v.startswith("*") or k in SPECIALIZED_16)}
    src = ASTSource(fn=fn, signature={k: full[k] for k in names}, constexprs=consts, attrs=attrs)
    c = triton.compile(src, target=TARGET, options=opts)
    return c


def gemm_consts(cfg):
    return dict(BLOCK_SIZE_M=cfg.BLOCK_SIZE_M, BLOCK_SIZE_N=cfg.BLOCK_SIZE_N, BLOCK_SIZE_K=cfg.BLOCK_SIZE_K,
                GROUP_SIZE_M=cfg.GROUP_SIZE_M)


def main():
    n = 0
    for dt in ("bf16", "fp16"):
        for W in (2, 4, 8):
            for one in (True, False):
                sig = dict(x_ptr=f"*{dt}", out_ptr=f"*{dt}", n="i32", buf_tab="*i64", cap="i32", pad_tab="*i64",
                           pad_off="i32", epoch_ptr="*i32", err_addr="i64", err_code="i32", rank="i32",
                           timeout_us="i32")
                c = compile_one(ar._all_reduce_kernel, sig, dict(WORLD=W, ONE_SHOT=one, BLOCK_SIZE=2048 if one else 4096,
                                                                  PAD_STRIDE=2048), num_warps=8)
                n += 1
            sig = dict(pad_tab="*i64", pad_off="i32", epoch_ptr="*i32", err_addr="i64", err_code="i32", rank="i32",
                       timeout_us="i32")
            compile_one(ag._ag_barrier, sig, dict(WORLD=W), num_warps=1)
            for cfg in gemm_configs():
                gc = gemm_consts(cfg)
                opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                sig = dict(a_ptr=f"*{dt}", b_ptr=f"*{dt}", bias_ptr=f"*{dt}", stage_tab="*i64", flag_tab="*i64",
                           cap="i32", epoch_ptr="*i32", M="i32", N="i32", K="i32", stride_am="i32", stride_ak="i32",
                           stride_bk="i32", stride_bn="i32", rank="i32")
                c = compile_one(gar._gemm_ar_producer, sig, dict(HAS_BIAS=True, EVEN_K=True, EVEN_N=True, **gc), **opts)
                if W == 2 and dt == "bf16":
                    print("gemm_ar producer", cfg, "smem", c.metadata.shared,
                          "wgmma" if "wgmma" in c.asm["ptx"] else "NO-WGMMA")
                sig = dict(out_ptr=f"*{dt}", stage_tab="*i64", flag_tab="*i64", cap="i32", epoch_ptr="*i32", M="i32",
                           N="i32", err_addr="i64", err_code="i32", rank="i32", timeout_us="i32")
                compile_one(gar._gemm_ar_reducer, sig, dict(WORLD=W, BLOCK_SIZE_M=cfg.BLOCK_SIZE_M,
                                                             BLOCK_SIZE_N=cfg.BLOCK_SIZE_N,
                                                             GROUP_SIZE_M=cfg.GROUP_SIZE_M), num_warps=8)
                sig = dict(a_ptr=f"*{dt}", b_ptr=f"*{dt}", bias_ptr=f"*{dt}", stage_tab="*i64", flag_tab="*i64",
                           cap="i32", epoch_ptr="*i32", M_seg="i32", N="i32", K="i32", stride_am="i32",
                           stride_ak="i32", stride_bk="i32", stride_bn="i32", rank="i32")
                compile_one(grs._gemm_rs_producer, sig, dict(WORLD=W, HAS_BIAS=False, EVEN_K=False, EVEN_N=False, **gc), **opts)
                sig = dict(out_ptr=f"*{dt}", stage_tab="*i64", flag_tab="*i64", cap="i32", epoch_ptr="*i32",
                           M_seg="i32", N="i32", err_addr="i64", err_code="i32", rank="i32", timeout_us="i32")
                compile_one(grs._gemm_rs_reducer, sig, dict(WORLD=W, BLOCK_SIZE_M=cfg.BLOCK_SIZE_M,
                                                             BLOCK_SIZE_N=cfg.BLOCK_SIZE_N,
                                                             GROUP_SIZE_M=cfg.GROUP_SIZE_M), num_warps=8)
                sig = dict(a_ptr=f"*{dt}", b_ptr=f"*{dt}", c_ptr=f"*{dt}", progress_ptr="*i32", m_seg="i32", N="i32",
                           K="i32", stride_am="i32", stride_ak="i32", stride_bk="i32", stride_bn="i32",
                           stride_cm="i32", err_addr="i64", err_code="i32", rank="i32", timeout_us="i32")
                c = compile_one(ag._ag_gemm_kernel, sig, dict(WORLD=W, EVEN_K=True, EVEN_N=True, **gc), **opts)
                if W == 2 and dt == "bf16":
                    print("ag gemm", cfg, "smem", c.metadata.shared,
                          "wgmma" if "wgmma" in c.asm["ptx"] else "NO-WGMMA")
                n += 5
    print("compiled", n, "kernel variants OK")


if __name__ == "__main__":
    main()
