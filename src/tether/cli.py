"""Command line: `tether train`, `tether eval`, `tether demo`.

tether train CONFIG.yaml [key=value ...] [--resume]
tether eval CONFIG.yaml [key=value ...]
tether demo [--quick] [--output DIR] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from tether.config import load_config
    from tether.train import train

    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume)
    if result.main_process:
        print(f"[tether] done: {result.steps} steps, final model in {result.final_model}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tether.evaluate.runner import main as eval_main

    return eval_main([args.config, *args.overrides])


def _demo(args: argparse.Namespace) -> int:
    from tether.demo import run_demo

    report = run_demo(
        output_dir=args.output, quick=args.quick, progress=not args.no_progress, model_path=args.model
    )
    print(f"[tether] demo report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="preference-train a local Hugging Face causal LM")
    p.add_argument("config", help="YAML config (see examples/)")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. objective.name=hdpo objective.alpha=0.9"
    )
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="sample and score models: pass@k, diversity, entropy, KL, reward")
    p.add_argument("config", help="YAML eval config (see docs/evaluate.md)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in toy task (no downloads)")
    p.add_argument("--quick", action="store_true", help="a smaller run (under a minute on 2 CPU cores)")
    p.add_argument("--output", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--model",
        default=None,
        metavar="FOLDER",
        help="run on this pretrained chat model (a local Hugging Face folder with a chat template, e.g. "
        "SmolLM2-135M-Instruct) instead of the toy model: no SFT, the verifiable chat task 'count'",
    )
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tether.config import ConfigError
    from tether.data import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError) as exc:
        print(f"tether {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
