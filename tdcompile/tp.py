"""Tensor-parallel Qwen3 for the unmodified Hugging Face model.

Three plans, all leaving ``modeling_qwen3.py`` untouched:

* ``"hf"``     -- transformers' own ``tp_plan`` (colwise q/k/v/gate/up, rowwise o/down,
                  ``lm_head`` colwise_gather_output). For inference we drop the
                  ``replicated_with_grad_allreduce`` entries: their backward hooks only
                  matter for training and make Dynamo break the graph.
* ``"torch"``  -- ``parallelize_module`` with Colwise/RowwiseParallel (Megatron TP).
* ``"torch_sp"`` -- the same plus sequence parallel on the norms: the residual stream is
                  a ``Shard(1)`` chunk of the sequence (needs S divisible by the world size).

The full weights are created identically on every rank (same seed, or the same
checkpoint) and each rank keeps its own shard; no communication happens while sharding.
"""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

PLANS = ("hf", "torch", "torch_sp", "none")


def tiny_qwen3_config(**overrides):
    """A 2-layer Qwen3 small enough to compile on 2 CPU cores in ~20 s."""
    from transformers import Qwen3Config

    kw = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, head_dim=32, vocab_size=1000, max_position_embeddings=512,
              tie_word_embeddings=False, rms_norm_eps=1e-6)
    kw.update(overrides)
    return Qwen3Config(**kw)


def build_model(config=None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", checkpoint: Optional[str] = None):
    """The single-process HF model (every rank builds the same one)."""
    from transformers import Qwen3ForCausalLM

    if checkpoint is not None:
        model = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    else:
        torch.manual_seed(seed)
        # a copy: applying a TP plan writes distributed_config onto model.config
        model = Qwen3ForCausalLM(copy.deepcopy(config) if config is not None else tiny_qwen3_config())
    return model.to(device=device, dtype=dtype).eval()


def default_mesh() -> DeviceMesh:
    device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def inference_hf_plan(model) -> dict[str, str]:
    """HF's plan without the training-only ``replicated_with_grad_allreduce`` entries."""
    return {k: v for k, v in model.tp_plan.items() if v != "replicated_with_grad_allreduce"}


def apply_hf_plan(model, mesh: DeviceMesh):
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    plan = inference_hf_plan(model)
    model.config.distributed_config = DistributedConfig(tp_size=mesh.size(), tp_plan=plan)
    model.tp_plan = plan
    model._device_mesh, model._tp_size = mesh, mesh.size()
    return apply_tensor_parallelism(model, mesh)


def apply_torch_plan(model, mesh: DeviceMesh, *, sequence_parallel: bool = False):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    out = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    for layer in model.model.layers:
        plan = {f"self_attn.{p}_proj": ColwiseParallel() for p in "qkv"}
        plan |= {f"mlp.{p}_proj": ColwiseParallel() for p in ("gate", "up")}
        plan |= {"self_attn.o_proj": RowwiseParallel(output_layouts=out),
                 "mlp.down_proj": RowwiseParallel(output_layouts=out)}
        if sequence_parallel:
            plan |= {
                "input_layernorm": SequenceParallel(),
                "post_attention_layernorm": SequenceParallel(),
                # HF calls self_attn with hidden_states as a keyword argument.
                "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                desired_input_kwarg_layouts={"hidden_states": Replicate()},
                                                use_local_output=True),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                          use_local_output=True),
            }
        parallelize_module(layer, mesh, plan)
    if sequence_parallel:
        # The embedding stays replicated; layer 0 takes its own sequence chunk (no communication).
        parallelize_module(model.model.layers[0], mesh, PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True))
        parallelize_module(model, mesh, {
            "model.norm": SequenceParallel(use_local_output=True),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())})
    else:
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    return model


def build_tp_model(config=None, *, plan: str = "hf", seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", checkpoint: Optional[str] = None,
                   mesh: Optional[DeviceMesh] = None):
    """Build the HF Qwen3 and shard it with ``plan`` over ``mesh`` (default: the whole world)."""
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    model = build_model(config, seed=seed, dtype=dtype, device=device, checkpoint=checkpoint)
    if plan == "none" or not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    mesh = mesh or default_mesh()
    if plan == "hf":
        return apply_hf_plan(model, mesh)
    return apply_torch_plan(model, mesh, sequence_parallel=(plan == "torch_sp"))


def rank_env() -> tuple[int, int]:
    """(rank, world) from the process group, or from torchrun's environment."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
