"""Model configs and sharded construction without ever holding the full model.

``build_sharded`` builds the unmodified HF ``Qwen3ForCausalLM`` on the meta device, applies a
TP plan of :mod:`tdcompile.tp` (the plans shard meta DTensors without touching data), then
materializes each parameter's *local* shard on ``device``:

* random init: every full tensor is drawn from a generator seeded by ``(seed, name)``, one
  tensor at a time, and the rank keeps its slice -- so every plan and world size (and the
  single-device reference of ``--check``) sees the same weights; peak extra memory is one
  full tensor (the embedding, 1.5 GB at Qwen3-32B in bf16), never the model;
* checkpoint: each rank reads only its slice of each tensor from the safetensors files.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import zlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from tdcompile import tp

QWEN3_32B = dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                 attention_bias=False)

MODELS = ("tiny", "qwen3-32b")
"""Model names of the command line (:func:`get_config`)."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Command-line dtype names. The one definition: import it from here."""


def qwen3_32b_config(**overrides):
    """Qwen3-32B's architecture (``num_hidden_layers=`` to shorten it)."""
    from transformers import Qwen3Config

    kw = dict(QWEN3_32B)
    kw.update(overrides)
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    return Qwen3Config(**kw)


def get_config(name: str, layers: Optional[int] = None):
    """``"tiny"`` (tests, CPU) or ``"qwen3-32b"``; ``layers`` overrides the layer count."""
    over = {} if layers is None else {"num_hidden_layers": layers}
    if name == "tiny":
        return tp.tiny_qwen3_config(**over)
    if name in ("qwen3-32b", "qwen3_32b", "32b"):
        return qwen3_32b_config(**over)
    raise ValueError(f"unknown model {name!r}: one of {MODELS}")


def _local_box(p) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of ``p`` (a DTensor or a plain tensor)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(p, DTensor):
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return tuple(shape), tuple(offset)
    return tuple(p.shape), (0,) * p.dim()


def _narrow(t: torch.Tensor, shape, offset) -> torch.Tensor:
    for d, (n, o) in enumerate(zip(shape, offset)):
        if n != t.shape[d]:
            t = t.narrow(d, o, n)
    return t


def _random_full(name: str, shape, dtype, device, seed: int, std: float) -> torch.Tensor:
    """The full tensor ``name`` as every rank (and the single-device reference) draws it."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=g)


class _Checkpoint:
    """Lazy reader of a ``save_pretrained`` directory: one slice of one tensor at a time."""

    def __init__(self, path: str, device):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            files = {}
            for fn in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
                with safe_open(fn, framework="pt") as f:
                    files.update({k: fn for k in f.keys()})
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {path}")
        self.files, self.device, self._open = files, device, {}

    def read(self, name: str, shape, offset, dtype) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        fn = self.files[name]
        if fn not in self._open:
            self._open[fn] = safe_open(fn, framework="pt")
        sl = self._open[fn].get_slice(name)
        idx = tuple(slice(o, o + n) for n, o in zip(shape, offset))
        return sl[idx].to(device=self.device, dtype=dtype)  # only this rank's box is read


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)


def build_sharded(config=None, plan: str = "hf", *, dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str = "cpu", checkpoint: Optional[str] = None, seed: int = 0,
                  mesh=None, progress: Optional[bool] = None):
    """HF Qwen3 sharded with ``plan`` (``tp.PLANS``) over ``mesh`` (default: the whole world),
    only this rank's shards allocated on ``device``; random weights or ``checkpoint``'s."""
    from torch.distributed.tensor import DTensor
    from tqdm.auto import tqdm
    from transformers import AutoConfig, Qwen3ForCausalLM

    if plan not in tp.PLANS:
        raise ValueError(f"plan must be one of {tp.PLANS}, got {plan!r}")
    if config is None:
        config = AutoConfig.from_pretrained(checkpoint) if checkpoint else tp.tiny_qwen3_config()
    config = copy.deepcopy(config)  # the HF plan writes distributed_config into the model's config
    device = torch.device(device)
    rank, world = tp.rank_env()
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    if plan != "none" and dist.is_initialized() and world > 1:
        mesh = mesh or tp.default_mesh()
        if plan == "hf":
            tp.apply_hf_plan(model, mesh)
        else:
            tp.apply_torch_plan(model, mesh, sequence_parallel=(plan == "torch_sp"))

    ckpt = _Checkpoint(checkpoint, device) if checkpoint else None
    params = list(model.named_parameters(remove_duplicate=False))
    show = (rank == 0) if progress is None else progress
    desc = f"rank {rank}: {'loading' if ckpt else 'initializing'} {plan} shards on {device}"
    for name, p in tqdm(params, desc=desc, disable=not show, unit="tensor"):
        shape, offset = _local_box(p)
        if ckpt is not None:
            key = name
            if name not in ckpt.files and name == "lm_head.weight" and config.tie_word_embeddings:
                key = "model.embed_tokens.weight"
            local = ckpt.read(key, shape, offset, dtype)
        else:
            full = _random_full(name, tuple(p.shape), dtype, device, seed, config.initializer_range)
            local = _narrow(full, shape, offset).contiguous()  # [local shape]
            del full
        if isinstance(p, DTensor):
            local = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                       shape=p.shape, stride=p.stride())
        _set_param(model, name, local)
    if config.tie_word_embeddings and not isinstance(model.lm_head.weight, DTensor):
        model.lm_head.weight = model.model.embed_tokens.weight

    # Non-persistent buffers (rotary inv_freq) are computed at init: recompute them on device.
    rot = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rot)(config=model.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left}")
    return model.eval()

