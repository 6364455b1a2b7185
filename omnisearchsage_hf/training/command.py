"""``omnisearchsage-train``: train from a bundled config name or a YAML file, on one process or many.

    omnisearchsage-train --config tiny                                    # generated data, about a minute
    omnisearchsage-train --config xquad_r --output_dir runs/x --train.max_steps 50
    accelerate launch --multi_gpu --num_processes 2 -m omnisearchsage_hf.training.command --config tiny

``training/train.py`` (the ``accelerate launch training/train.py`` entry of the design card) calls the same
``main``. Any config key is overridden as ``--section.key value`` (the value is read as YAML). A run folder
that already holds a run is refused unless ``--resume`` (continue from its newest checkpoint) or
``--overwrite`` (start over) says what to do with it. When training ends, one held-out query is run through
the exported towers, loaded back from disk, as a check that the run's output works.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ..cli_errors import run_command
from .config import TrainingConfig, load_config, parse_overrides

PROG = "omnisearchsage-train"


def bundled_configs() -> dict[str, Path]:
    """Config name → file of the configs shipped in the package (``tiny``, ``xquad_r``, ``amazon_pqa``…)."""
    folder = resources.files("omnisearchsage_hf.training") / "configs"
    return {Path(str(entry)).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_config(name_or_path: str) -> Path:
    """A YAML file path as given, or the bundled config of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    configs = bundled_configs()
    if name_or_path in configs:
        return configs[name_or_path]
    raise FileNotFoundError(
        f"--config {name_or_path!r} is neither a YAML file nor a bundled config; bundled: {sorted(configs)}."
    )


def config_reference() -> str:
    """Every config section and key with its default, for ``--help``."""
    lines = ["config sections and keys (override any with --section.key VALUE, read as YAML):"]
    for section, values in TrainingConfig().to_dict().items():
        if not isinstance(values, dict):  # a top-level key such as output_dir
            lines.append(f"  --{section}  (default {values!r})")
            continue
        lines.append(f"  {section}:")
        lines += [f"    --{section}.{key}  (default {default!r})" for key, default in values.items()]
    lines += [
        "",
        "examples:",
        "  --train.max_steps 50   --loss.matryoshka_dims [64,128]   --model.query '{out_dim: 128}'",
        "  --data.tasks '[{name: q, candidate: \"entity:pin\", pairs: pairs.parquet}]'",
        f"bundled configs: {', '.join(sorted(bundled_configs()))}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train OmniSearchSage's query and entity towers together (multi-task sampled softmax).",
        epilog=config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="a bundled config name (see below) or a YAML file")
    parser.add_argument("--output_dir", help="the run folder (overrides `output_dir` of the config)")
    parser.add_argument("--max_steps", type=int, help="optimizer steps (overrides `train.max_steps`)")
    run = parser.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace the run in output_dir and start over")
    parser.add_argument("--no-example", action="store_true", help="skip the example query after training")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, train, and print an example query against the exported towers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)

    def train() -> int:
        overrides = parse_overrides(rest)
        if args.output_dir is not None:
            overrides["output_dir"] = args.output_dir
        if args.max_steps is not None:
            overrides["train.max_steps"] = args.max_steps
        config = load_config(resolve_config(args.config), overrides)
        from transformers.utils import logging as transformers_logging

        from .trainer import Trainer  # the loop (and accelerate) load only once the command line is valid

        transformers_logging.disable_progress_bar()  # per-shard save/load bars would bury the training log

        trainer = Trainer(config)
        trainer.train(resume=args.resume, overwrite=args.overwrite)
        if trainer.accelerator.is_main_process and not args.no_example:
            from .example import print_example_query

            print_example_query(Path(config.output_dir), trainer.data, config)
        return 0

    return run_command(PROG, train, argv)


__all__ = ["PROG", "build_parser", "bundled_configs", "config_reference", "main", "resolve_config"]

if __name__ == "__main__":
    sys.exit(main())
