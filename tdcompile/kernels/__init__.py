"""Triton kernels over symmetric memory (CUDA only). Imported lazily by tdcompile.ops.cuda."""
