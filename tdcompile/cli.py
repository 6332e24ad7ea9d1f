"""tdcompile: the command line of the tdist torch.compile backend.

Every command starts its own ranks (gloo on CPU, NCCL with one GPU per rank; --nproc sets
how many) unless it runs under torchrun, which then decides the ranks.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from tdcompile import bench, calibrate, demo, generate, launch
from tdcompile.config import Options
from tdcompile.generate import positive_int

EPILOG = "Run 'tdcompile COMMAND --help' for the flags of one command."

COMMANDS = {
    # name: (one-line help, description, default --nproc)
    "demo": ("the quick tour: rewrite report, then compiled vs eager",
             "Compile a tensor-parallel Qwen3 (tiny and random by default) with tdist, print the rewrite "
             "report, then the largest difference to the eager TP model and to a single-process model. On GPUs "
             "it also times compiled vs eager. Takes about a minute on a 2-core CPU.", 2),
    "inspect": ("the rewrite report only: matches, shapes, candidates, decisions; no timing",
                "Compile a tensor-parallel Qwen3 with tdist and print what the pass did: every match with its "
                "module path, M/N/K and dtype, each candidate implementation with its time in microseconds and "
                "where that time came from (measured, cached, shipped table, predicted), the choice and why, "
                "and per graph whether sequence parallel was applied. Graph code on request (--show-graph, "
                "--dump-dir). On a GPU, shapes missing from the measured table are measured while compiling, "
                "all ranks together, and the report shows those measurements.", 2),
    "generate": ("generate tokens with the Engine (prefill + decode, CUDA graphs on GPU)",
                 "Run the inference Engine (StaticCache prefill, then one decode step per token, replayed from "
                 "a CUDA graph on GPUs) on random prompts and print a JSON summary: prefill and decode times, "
                 "tokens per second, compile time and the first generated tokens.", 2),
    "bench": ("benchmark Qwen3 cases: eager, inductor, async-TP, bound and tdist columns",
              "Time layer-level (MLP, attention), end-to-end forward and full-inference cases of Qwen3 at "
              "TP = number of ranks, one column per backend, and write a JSON table (and a chart) to --out. "
              "Use --quick on CPU (tiny model, a few tiny cases); --check compares outputs instead of timing.",
              2),
    "calibrate": ("measure candidate kernels on this machine's GPUs and fit the cost model",
                  "Time every candidate implementation for the shapes of --model at each --m on all ranks "
                  "together, store them in the measured table that strategy 'auto' decides from, and fit the "
                  "analytic cost model (used only without a GPU) to them. Needs GPUs.", 1),
}
_ADD_ARGS = {"demo": demo.add_args, "inspect": lambda p: demo.add_args(p, inspect=True),
             "generate": generate.add_generate_args, "bench": bench.add_bench_args,
             "calibrate": calibrate.add_calibrate_args}


class Parser(argparse.ArgumentParser):
    """Errors in one line, pointing at --help (instead of the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> Parser:
    parser = Parser(prog="tdcompile", description=__doc__.strip().splitlines()[0], epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logs of the tdist passes, e.g. why a collective stays unfused")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (short, long, nproc) in COMMANDS.items():
        p = sub.add_parser(name, help=short, description=long)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logs of the tdist passes, e.g. why a collective stays unfused")
        p.add_argument("--nproc", type=positive_int, default=nproc,
                       help=f"ranks to start (default {nproc}; ignored under torchrun, which sets them)")
        _ADD_ARGS[name](p)
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values before any model is built or any rank started."""
    sub = f"{parser.prog} {args.cmd}"

    def fail(msg: str):
        parser.exit(2, f"{sub}: error: {msg} (see '{sub} --help')\n")

    if hasattr(args, "strategy") or hasattr(args, "profile"):
        options = {"strategy": getattr(args, "strategy", None) or "auto", "profile": getattr(args, "profile", None),
                   "dump_dir": getattr(args, "dump_dir", None)}
        try:
            Options.from_mapping(options)                # the backend's own checks, before anything is built
        except (TypeError, ValueError) as e:
            fail(str(e).removeprefix("tdist: "))
    ckpt = getattr(args, "checkpoint", None)
    if ckpt and not os.path.isdir(ckpt):
        fail(f"--checkpoint {ckpt!r} is not a directory")
    world = int(os.environ["WORLD_SIZE"]) if launch.under_torchrun() else args.nproc
    if getattr(args, "plan", None) == "torch_sp" and hasattr(args, "seq") and args.seq % world:
        fail(f"--plan torch_sp shards the sequence: --seq {args.seq} must be a multiple of the {world} ranks")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    fn = {"demo": demo.demo, "inspect": demo.inspect}.get(args.cmd)
    if fn is None:
        fn = _without_device({"generate": generate.generate_main, "bench": bench.bench_main,
                              "calibrate": calibrate.calibrate_main}[args.cmd])
    launch.run(_rank_main, args.nproc, fn, args)
    return 0


class _without_device:
    """``fn(args)`` called as ``fn(device, args)`` (picklable, for spawned ranks)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, device, args):
        return self.fn(args)


def _rank_main(device, fn, args) -> None:
    """What every rank runs: logging as asked (spawned ranks do not inherit it), then the command."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("tdcompile").setLevel(logging.DEBUG)
    fn(device, args)


if __name__ == "__main__":
    sys.exit(main())
