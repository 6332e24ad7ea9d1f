"""The ``tdist::*`` op definitions (``ops/library.py``): torch's own checks of every op (schema,
fake impl against the reference, tracing through AOT), and how a call reaches its kernel:
straight from the C++ dispatcher, with no Python layer of torch's between.  In Inductor's
un-graphed wrapper code each such layer is host time on every call.

``scripts/host_path_cpu.py`` times a replayed call's host path through these ops against the
same kernel behind a ``torch.library.custom_op`` twin."""
import sys

import pytest
import torch

import tdcompile  # noqa: F401  (registers torch.ops.tdist.*)
from tdcompile.ops import library


def _opcheck_args(group_name: str) -> dict:
    t = torch.randn
    return {"all_reduce": (t(4, 8), group_name),
            "gemm_all_reduce": (t(4, 8), t(8, 6), t(6), group_name),
            "all_gather_gemm": (t(2, 8), [t(8, 6), t(8, 3)], 2, group_name, True),
            "gemm_reduce_scatter": (t(4, 8), t(8, 6), None, 2, group_name),
            "all_reduce_rmsnorm": (t(4, 8), t(4, 8), t(8), 1e-6, group_name),
            "gemm_all_reduce_rmsnorm": (t(4, 8), t(8, 6), None, t(2, 2, 6), t(6), 1e-6, group_name)}


@pytest.mark.parametrize("op", library.OP_NAMES)
def test_torch_opcheck_passes_schema_fake_impl_and_aot_tracing(fake_pg, op):
    """The fake impl gives the reference's shapes, dtypes and strides; the op traces through AOT
    with dynamic shapes; it declares no mutation or aliasing it does not do."""
    assert set(_opcheck_args(fake_pg)) == set(library.OP_NAMES)
    got = torch.library.opcheck(getattr(torch.ops.tdist, op).default, _opcheck_args(fake_pg)[op],
                                kwargs={"impl": "unfused"},
                                test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                            "test_aot_dispatch_dynamic"))
    assert set(got.values()) == {"SUCCESS"}, got


def _stack_files() -> list[str]:
    f, files = sys._getframe(2), []
    while f is not None:
        files.append(f.f_code.co_filename.replace("\\", "/"))
        f = f.f_back
    return files


def _with_cpu_kernel(op: str, kernel, call):
    """``call()`` while ``kernel`` is tdist::op's CPU kernel (registered as ops/cuda.py does)."""
    lib = torch.library.Library("tdist", "IMPL")
    try:
        torch.library.register_kernel(f"tdist::{op}", "cpu", kernel, lib=lib)
        return call()
    finally:
        lib._destroy()


def test_every_op_reaches_its_device_kernel_with_no_python_layer_of_torch_library_between():
    for op in library.OP_NAMES:
        stacks = []

        def kernel(*args, **kwargs):
            stacks.append(_stack_files())
            raise StopIteration   # reached: the arguments need not make sense

        args = {"all_reduce": (torch.ones(2), "g"), "all_gather_gemm": (torch.ones(2, 2), [torch.ones(2, 2)], 2, "g")}
        a = (torch.ones(2, 2), torch.ones(2, 2, requires_grad=True), None)
        args.update({"gemm_all_reduce": (*a, "g"), "gemm_reduce_scatter": (*a, 2, "g"),
                     "all_reduce_rmsnorm": (torch.ones(2, 2), torch.ones(2, 2), torch.ones(2), 1e-6, "g"),
                     "gemm_all_reduce_rmsnorm": (*a, torch.ones(2, 2), torch.ones(2), 1e-6, "g")})
        try:
            with torch.no_grad():
                _with_cpu_kernel(op, kernel, lambda: getattr(torch.ops.tdist, op)(*args[op], impl="fused"))
        except StopIteration:
            pass
        assert len(stacks) == 1, f"{op}: the kernel was not reached"
        between = [f for f in stacks[0] if "torch/_library/" in f]
        assert between == [], f"{op}: torch.library's Python wrappers on the call path: {between}"


def test_an_unknown_impl_is_refused_by_the_default_implementation():
    with pytest.raises(ValueError, match="impl must be"):
        torch.ops.tdist.all_reduce(torch.ones(3), "0", impl="bogus")
