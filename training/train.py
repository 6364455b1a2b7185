"""Train OmniSearchSage's query and entity towers together, on one process or many.

    accelerate launch training/train.py --config training/configs/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 training/train.py --config training/configs/tiny.yaml
    python training/train.py --config training/configs/tiny.yaml --output_dir runs/x --train.max_steps 20

Any config key can be overridden as ``--section.key value``; ``--resume`` continues from the newest
checkpoint in the output folder. (On a CPU-only machine, ``accelerate launch --cpu --num_processes 2``
starts one process only: use ``--multi_gpu``, which falls back to gloo on CPU.)
"""

from __future__ import annotations

import argparse

from omnisearchsage_hf.training.config import load_config, parse_overrides
from omnisearchsage_hf.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see training/configs/)")
    parser.add_argument("--output_dir", help="overrides `output_dir`")
    parser.add_argument("--max_steps", type=int, help="overrides `train.max_steps`")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    args, rest = parser.parse_known_args()
    overrides = parse_overrides(rest)
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    Trainer(load_config(args.config, overrides)).train(resume=args.resume)


if __name__ == "__main__":
    main()
