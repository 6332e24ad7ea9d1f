"""The pipelined gemm_all_reduce schedule (``ops/overlap.py``): variant names and row chunks.

The schedule itself runs on CUDA only (tests/gpu/test_multigpu.py checks it against unfused
on real processes); what decides whether it may run is pure and specified here."""
import pytest

from tdcompile.ops import overlap


@pytest.mark.parametrize("name, parsed", [
    ("pipe2", (2, "tdist")), ("pipe4", (4, "tdist")), ("pipe4_nccl", (4, "nccl")), ("pipe8_nccl", (8, "nccl")),
    ("pipe1", None), ("pipe", None), ("one_shot", None), ("pipe4_mpi", None), (None, None)])
def test_variant_names(name, parsed):
    assert overlap.parse(name) == parsed


@pytest.mark.parametrize("m, chunks", [(4096, 2), (4096, 4), (1000, 2), (3000, 4), (2048, 4), (4097, 4)])
def test_chunks_cover_all_rows_once_on_aligned_boundaries(m, chunks):
    bounds = overlap.chunk_bounds(m, chunks)
    assert bounds is not None and len(bounds) == chunks
    assert bounds[0][0] == 0 and bounds[-1][1] == m
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(bounds, bounds[1:]))
    assert all(lo % overlap.ROW_ALIGN == 0 for lo, _ in bounds)
    assert min(hi - lo for lo, hi in bounds) >= overlap.MIN_CHUNK_ROWS


@pytest.mark.parametrize("m, chunks", [(128, 2), (511, 2), (1024, 8), (129, 4)])
def test_too_few_rows_are_refused(m, chunks):
    assert overlap.chunk_bounds(m, chunks) is None


def test_unsupported_reason_names_the_shape():
    import torch
    a, b = torch.empty(128, 64), torch.empty(64, 32)
    assert "M=128" in overlap.unsupported_reason(a, b, "pipe2")
    assert overlap.unsupported_reason(torch.empty(4096, 64), b, "pipe4_nccl") is None
    assert "unknown" in overlap.unsupported_reason(a, b, "pipe0")


@pytest.mark.parametrize("name, chunks", [("ce2", 2), ("ce4", 4), ("ce16", 16), ("ce1", None), ("ce", None),
                                          ("pipe4", None), ("ce4_nccl", None), (None, None)])
def test_copy_engine_variant_names(name, chunks):
    assert overlap.parse_ce(name) == chunks


@pytest.mark.parametrize("name, chunks, carveout", [("ce4s8", 4, 8), ("ce2s16", 2, 16), ("ce4", 4, 0),
                                                    ("ce4s", None, 0), ("pipe4", None, 0)])
def test_a_copy_engine_variant_may_name_the_sms_its_gemms_leave_free(name, chunks, carveout):
    assert overlap.parse_ce(name) == chunks and overlap.ce_carveout(name) == carveout
