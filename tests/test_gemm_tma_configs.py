"""The TMA GEMM's host side (tdcompile/kernels/gemm_tma.py), on CPU tensors: which config a shape
gets and which operands the kernel refuses.  The kernel itself is tested on a GPU
(tests/gpu/test_gemm_tma.py) and measured by benchmarks/bench_gemm.py."""
import pytest
import torch

pytest.importorskip("triton")

from tdcompile.kernels.gemm_tma import TmaConfig, b_layout, pick_tma_config, tma_configs, unsupported_reason  # noqa: E402

HIDDEN, INTER, Q, KV = 5120, 25600, 8192, 1024


def _qwen3_shapes():
    for W in (1, 2, 4, 8):
        for M in (1, 64, 128, 129, 1024, 4096, 16384):
            for N, K in ((Q // W, HIDDEN), (KV // W, HIDDEN), (INTER // W, HIDDEN), (HIDDEN, Q // W),
                         (HIDDEN, INTER // W)):
                yield M, N, K


def test_every_pick_is_a_measured_candidate():
    """pick_tma_config only returns configs that benchmarks/bench_gemm.py measures (tma_configs)."""
    measured = set(tma_configs())
    for M, N, K in _qwen3_shapes():
        assert pick_tma_config(M, N, K) in measured, (M, N, K)


def test_accumulate_picks_fit_shared_memory():
    """With C read back (accumulate), no pick keeps the 4-stage 128x256 config (262 KB > 227 KB)."""
    for M, N, K in _qwen3_shapes():
        cfg = pick_tma_config(M, N, K, accumulate=True)
        assert not (cfg.BLOCK_SIZE_M == 128 and cfg.BLOCK_SIZE_N == 256 and cfg.num_stages > 3), (M, N, K)


def test_decode_sizes_use_64_row_tiles_and_prefill_128():
    assert pick_tma_config(128, 5120, 12800).BLOCK_SIZE_M == 64
    assert pick_tma_config(4096, 5120, 12800).BLOCK_SIZE_M == 128
    assert pick_tma_config(4096, 256, 5120).BLOCK_SIZE_N == 128        # narrow N: k/v_proj
    assert pick_tma_config(4096, 12800, 5120).BLOCK_SIZE_N == 256


def test_config_names_are_unique_and_readable():
    names = [c.name() for c in tma_configs()]
    assert len(names) == len(set(names))
    assert TmaConfig(BLOCK_SIZE_M=128, BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, num_stages=3,
                     EPILOGUE_SUBTILE=True, FLATTEN=False).name() == "128x256x64w8s3en"


def test_b_is_read_in_whichever_layout_is_row_major():
    w = torch.zeros(64, 128, dtype=torch.bfloat16)            # nn.Linear weight [N, K]
    mat, kn = b_layout(w.t())                                 # the traced graph's [K, N] view
    assert not kn and mat.data_ptr() == w.data_ptr() and mat.shape == (64, 128)
    mat, kn = b_layout(w.t().contiguous())                    # a row-major [K, N]
    assert kn and mat.shape == (128, 64)


def test_refusals_name_the_reason():
    a = torch.zeros(64, 128, dtype=torch.bfloat16)
    w = torch.zeros(64, 128, dtype=torch.bfloat16)
    assert unsupported_reason(a, w.t()) is None
    assert "dtypes" in unsupported_reason(a.float(), w.t().float())
    assert "shapes" in unsupported_reason(a, torch.zeros(64, 100, dtype=torch.bfloat16).t())
    assert "A not 16-byte aligned" in unsupported_reason(torch.zeros(64, 130, dtype=torch.bfloat16)[:, 1:129], w.t())
    assert "B not 16-byte aligned" in unsupported_reason(a, torch.zeros(64, 136, dtype=torch.bfloat16)[:, 1:129].t())
    assert "N * element size" in unsupported_reason(a, torch.zeros(12, 128, dtype=torch.bfloat16).t())
    cfg = pick_tma_config(4096, 64, 128)
    assert "shard rows 100" in unsupported_reason(a, w.t(), m_seg=100, cfg=cfg)
