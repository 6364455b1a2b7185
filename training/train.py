"""Train OmniSearchSage's query and entity towers together, on one process or many.

    accelerate launch training/train.py --config training/configs/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 training/train.py --config tiny
    python training/train.py --config tiny --output_dir runs/x --train.max_steps 20

The same command as ``omnisearchsage-train`` (``--help`` lists every config key): ``--config`` takes a YAML
file or a bundled config name, any key is overridden as ``--section.key value``, ``--resume`` continues the
run in the output folder and ``--overwrite`` starts it over. (On a CPU-only machine, ``accelerate launch
--cpu --num_processes 2`` starts one process only: use ``--multi_gpu``, which falls back to gloo on CPU.)
"""

import sys

from omnisearchsage_hf.training.command import main

if __name__ == "__main__":
    sys.exit(main())
