"""``tdcompile`` command line: demo, inspect, generate, bench, calibrate."""
from __future__ import annotations

import argparse
import logging
import sys

from tdcompile import launch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tdcompile", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs of the passes (why not fused)")
    sub = parser.add_subparsers(dest="cmd", required=True)

    from tdcompile import demo
    p_demo = sub.add_parser("demo", help="tiny Qwen3 on 2 CPU ranks: rewrite report + compiled vs eager")
    demo.add_args(p_demo)
    p_inspect = sub.add_parser("inspect", help="print the rewrite report for a model/plan/strategy")
    demo.add_args(p_inspect)
    p_inspect.set_defaults(show_graph=False)

    extra = {}
    for name, mod_name, add, main_fn in (("generate", "tdcompile.generate", "add_generate_args", "generate_main"),
                                         ("bench", "tdcompile.bench", "add_bench_args", "bench_main"),
                                         ("calibrate", "tdcompile.calibrate", "add_calibrate_args", "calibrate_main")):
        try:
            mod = __import__(mod_name, fromlist=[add])
        except ImportError:
            continue
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else name)
        p.add_argument("--nproc", type=int, default=2 if name != "calibrate" else 1)
        getattr(mod, add)(p)
        extra[name] = getattr(mod, main_fn)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("tdcompile").setLevel(logging.DEBUG)
    if args.cmd in ("demo", "inspect"):
        launch.run(demo.demo, args.nproc, args)
    else:
        launch.run(_call, args.nproc, extra[args.cmd], args)
    return 0


def _call(device, fn, args) -> None:
    fn(args)  # runs inside the initialized process group; the device is the rank's current one


if __name__ == "__main__":
    sys.exit(main())
