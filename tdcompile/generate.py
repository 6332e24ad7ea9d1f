"""tdcompile generate: run the Engine on a (sharded) Qwen3 with random prompts.

Runs inside an initialized process group (world may be 1); default: the tiny model on CPU.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from tdcompile.config import STRATEGIES
from tdcompile.engine import BACKENDS
from tdcompile.models import DTYPES, MODELS
from tdcompile.tp import PLANS


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser, *, strategy_default: str | None = "auto",
                   cuda_graphs: bool = True) -> None:
    """The model and compile flags shared by generate, bench, demo and inspect."""
    p.add_argument("--model", choices=MODELS, default="tiny",
                   help="architecture: 'tiny' (2-layer random Qwen3 for CPU) or 'qwen3-32b' "
                        "(random weights unless --checkpoint); default %(default)s")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="keep only this many decoder layers (default: all of the model's)")
    p.add_argument("--checkpoint", default=None,
                   help="local directory written by save_pretrained (config + safetensors); "
                        "overrides --model; default: random weights")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights and activations (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")
    if strategy_default is None:
        strategy_help = "how tdist decides each match (default: 'fused' on CPU so the rewrite shows, " \
                        "'auto' on GPU)"
    else:
        strategy_help = f"how tdist decides each match (default: {strategy_default})"
    p.add_argument("--strategy", choices=STRATEGIES, default=strategy_default,
                   help=strategy_help + "; auto = fastest measured candidate (predicted without a GPU), "
                        "unfused = plain Inductor, fused / symm_mem = force that implementation, "
                        "sequence_parallel = all_reduce -> reduce_scatter + all_gather, "
                        "bound = collectives become no-ops (timing only, output NOT valid)")
    p.add_argument("--profile", default=None,
                   help="device profile for the cost model: 'h100', 'h200' or a JSON written by "
                        "'tdcompile calibrate' (default: the GPU in use; none on CPU)")
    if cuda_graphs:
        p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="run decode steps directly instead of replaying CUDA graphs (GPU only)")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--plan", choices=PLANS, default="hf",
                   help="tensor-parallel plan: hf (transformers' tp_plan), torch (parallelize_module), "
                        "torch_sp (with sequence parallel; prefill only), none (replicated); default %(default)s")
    p.add_argument("--backend", default="tdist", choices=BACKENDS,
                   help="eager (no compile), inductor (torch.compile default) or tdist; default %(default)s")
    p.add_argument("--batch", type=positive_int, default=2, help="prompts generated together (default 2)")
    p.add_argument("--prompt-len", type=positive_int, default=8, help="tokens per random prompt (default 8)")
    p.add_argument("--new-tokens", type=positive_int, default=16, help="tokens generated per prompt (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--repeat", type=positive_int, default=2,
                   help="generate this many times; the first run compiles, the last is reported (default 2)")


def model_setup(args, device=None):
    """(config, dtype, device) from the common arguments (``device``: default this rank's)."""
    from tdcompile.engine import rank_device
    from tdcompile.models import get_config

    device = device or rank_device()
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
    """The ``options`` of ``torch.compile(backend="tdist")`` from the command line."""
    options = {"strategy": args.strategy}
    if getattr(args, "profile", None):
        options["profile"] = args.profile
    return options


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
