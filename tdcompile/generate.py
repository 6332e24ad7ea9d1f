"""``tdcompile generate``: run the Engine on a (sharded) Qwen3 with random prompts.

Runs inside an initialized process group (world may be 1); default: the tiny model on CPU.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (CPU tests) or 'qwen3-32b'")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--checkpoint", default=None, help="local save_pretrained dir with safetensors")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", default="auto", help="tdist strategy (auto|fused|unfused|sequence_parallel)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--plan", default="hf", help="TP plan: hf | torch | torch_sp (prefill only) | none")
    p.add_argument("--backend", default="tdist", choices=("eager", "inductor", "tdist"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=2, help="generate this many times (the first compiles)")


def model_setup(args):
    """(config, dtype, device) from the common arguments."""
    from tdcompile.engine import rank_device
    from tdcompile.models import get_config

    device = rank_device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.checkpoint:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.checkpoint)
        if args.layers:
            config.num_hidden_layers = args.layers
    else:
        config = get_config(args.model, args.layers)
    return config, dtype, device


def tdist_options(args) -> dict:
    return {"strategy": args.strategy}


def generate_main(args) -> dict:
    from tdcompile.engine import Engine
    from tdcompile.models import build_sharded

    rank = dist.get_rank() if dist.is_initialized() else 0
    config, dtype, device = model_setup(args)
    model = build_sharded(config, args.plan, dtype=dtype, device=device, checkpoint=args.checkpoint, seed=args.seed)
    options = tdist_options(args) if args.backend == "tdist" else None
    engine = Engine(model, args.backend, options, max_batch=args.batch, max_seq=args.prompt_len + args.new_tokens,
                    cuda_graphs=args.cuda_graphs)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=gen)  # [B, S]
    runs = [engine.generate(prompt, args.new_tokens, args.temperature, args.top_p, seed=args.seed)
            for _ in range(max(1, args.repeat))]
    last = runs[-1]
    result = {"backend": args.backend, "plan": args.plan, "world": dist.get_world_size() if dist.is_initialized() else 1,
              "device": str(device), "dtype": str(dtype).split(".")[-1], "layers": config.num_hidden_layers,
              **last.summary(), "compile_s": round(sum(r.compile_s for r in runs), 2),
              "cuda_graphs": engine.graphs_on, "tokens": last.tokens[:, :16].tolist()}
    if rank == 0:
        print(json.dumps(result, indent=2))
    return result


def init_from_env() -> None:
    """Under torchrun (WORLD_SIZE set) join the process group like ``tdcompile.launch`` does:
    NCCL with one GPU per rank (multicast kept off), else gloo."""
    import os

    from tdcompile.launch import init_process_group

    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        init_process_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))


def main(argv=None) -> dict:  # python -m tdcompile.generate, or torchrun --nproc_per_node=N -m ...
    p = argparse.ArgumentParser(description=__doc__)
    add_generate_args(p)
    init_from_env()
    return generate_main(p.parse_args(argv))


if __name__ == "__main__":
    main()
