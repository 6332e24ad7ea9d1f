"""GPU tests: ``gpu`` (one GPU, simulated ranks) and ``multigpu`` (real processes, >= 2 GPUs).
Both are skipped automatically on machines without CUDA (CPU CI) or without Triton."""
import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_triton = importlib.util.find_spec("triton") is not None
    n_gpu = torch.cuda.device_count() if has_cuda else 0
    for item in items:
        if "gpu" in item.keywords or "multigpu" in item.keywords:
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))
            elif not has_triton:
                item.add_marker(pytest.mark.skip(reason="needs triton"))
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs >= 2 GPUs (found {n_gpu})"))
