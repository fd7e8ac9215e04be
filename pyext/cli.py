"""The `tokenbounds` command. Each subcommand lives in tokenbounds.commands.<name> and exposes
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported
only when their subcommand runs, so a slow import never delays `--help`."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": "Train 3 small GPTs at D = 20 N, quantize each (best of a paid grid), report every bound vs size.",
    "bound": "Compute every bound from saved evaluation statistics (stats.json).",
    "hessian": "Estimate Hessian trace / spectrum of a model's token loss; writes JSON + a PNG.",
    "evaluate": "Evaluate a local model on sampled training tokens: stats, every bound, report, plots.",
    "plan": "Estimate time, memory and GPUs for an evaluation from a roofline model.",
    "prequential": "Prequential code length and excess description length (EDL) of one training pass; JSON + PNG.",
    "length": "Loss and bound per position bucket, inside and beyond the training context; JSON + a PNG.",
    "quantize": "Quantize a local model (QuIP-style) into a .tbq file whose size in bits is the complexity C.",
    "scaling": "Compute-optimal scaling study: >= 5 GPTs at D = 20 N, each bounded over its own D tokens; bound vs N.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbounds",
        description="Non-vacuous token-level generalization bounds for language models.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=f"tokenbounds.commands.{name}")
        try:
            module = importlib.import_module(f"tokenbounds.commands.{name}")
        except ImportError:
            continue
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
