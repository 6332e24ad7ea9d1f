"""``ops/gemm_all_reduce.py``: each ``fused`` variant name reaches its implementation with the
right arguments (kernels replaced by recorders: this runs on CPU; the kernels themselves are
tested on GPUs in tests/gpu)."""
import pytest
import torch

pytest.importorskip("triton")

from tdcompile.ops import gemm_all_reduce as gar  # noqa: E402
from tdcompile.ops import overlap  # noqa: E402

A, B = torch.randn(1024, 32), torch.randn(32, 16)                    # [M, K], [K, N]
BIAS = torch.randn(16)


@pytest.fixture
def calls(monkeypatch):
    from tdcompile.kernels import all_reduce, all_reduce_lamport, gemm_all_reduce, gemm_all_reduce_ce
    seen = []
    monkeypatch.setattr(gemm_all_reduce, "gemm_all_reduce", lambda ws, a, b, bias: seen.append(("triton", bias)) or "T")
    monkeypatch.setattr(all_reduce_lamport, "all_reduce_lamport",
                        lambda ws, y, out=None: seen.append(("lamport", y, out)) or y)
    monkeypatch.setattr(gemm_all_reduce_ce, "gemm_all_reduce_ce",
                        lambda ws, a, b, bias, bounds, out=None, sm_carveout=0:
                        seen.append(("ce", bounds, out, sm_carveout)) or "CE")
    monkeypatch.setattr(all_reduce, "symm_input", lambda ws, shape, dtype: torch.empty(shape, dtype=dtype))
    monkeypatch.setattr(all_reduce, "all_reduce",
                        lambda ws, buf, out=None, variant=None: seen.append(("zc", variant, buf, out)) or
                        (buf if out is None else out))
    monkeypatch.setattr(overlap, "gemm_all_reduce",
                        lambda a, b, bias, chunks, red, side: seen.append(("pipe", chunks, red)) or "P")
    monkeypatch.setattr(overlap, "nccl_reducer", lambda g: "nccl")
    monkeypatch.setattr(overlap, "tdist_reducer", lambda ws: "tdist")
    return seen


class _WS:
    side = "side-stream"


def test_plain_fused_is_the_triton_gemm_kernel(calls):
    assert gar.run(None, _WS(), A, B, BIAS, "g") == "T" and calls == [("triton", BIAS)]


@pytest.mark.parametrize("v", ["one_shot", "two_shot"])
def test_one_and_two_shot_read_the_gemm_output_in_place(calls, v):
    dst = torch.empty(1024, 16)
    out = gar.run(v, _WS(), A, B, BIAS, "g", out=dst)
    (kind, variant, buf, to), = calls
    assert kind == "zc" and variant == v and to is dst and out is dst    # the GEMM wrote the symmetric buffer,
    torch.testing.assert_close(buf, torch.addmm(BIAS, A, B))               # reduced into the caller's output


def test_lamport_reduces_the_gemm_output_in_place(calls):
    out = gar.run("lamport", _WS(), A, B, None, "g")
    (kind, y, dst), = calls
    assert kind == "lamport" and dst is y and out is y
    torch.testing.assert_close(y, A @ B)


@pytest.mark.parametrize("v, chunks, reducer", [("pipe2", 2, "tdist"), ("pipe4_nccl", 4, "nccl")])
def test_pipelined_variants_pick_chunks_and_reducer(calls, v, chunks, reducer):
    assert gar.run(v, _WS(), A, B, None, "g") == "P" and calls == [("pipe", chunks, reducer)]


def test_copy_engine_variant_gets_the_row_chunks(calls):
    assert gar.run("ce4", _WS(), A, B, None, "g") == "CE"
    assert calls == [("ce", overlap.chunk_bounds(1024, 4), None, 0)]


def test_copy_engine_variant_writes_the_given_output_with_its_sm_carveout(calls):
    dst = torch.empty(1024, 16)
    assert gar.run("ce2s8", _WS(), A, B, None, "g", out=dst) == "CE"
    assert calls == [("ce", overlap.chunk_bounds(1024, 2), dst, 8)]


@pytest.mark.parametrize("v, yes", [("one_shot", True), ("two_shot", True), ("ce4", True), ("ce2s8", True),
                                    ("lamport", False), ("pipe2", False), (None, False)])
def test_the_variants_that_write_a_given_output_are_those_an_op_graph_can_replay(v, yes):
    assert gar.writes_out(v) is yes


def test_prepare_refuses_shapes_a_variant_cannot_take_with_the_reason():
    small = torch.randn(128, 32)
    assert "too small" in gar.prepare("ce4", _WS(), small, B, None)
    assert "M=128" in gar.prepare("pipe2", _WS(), small, B, None)
