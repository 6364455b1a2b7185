"""Training: the multi-task sampled-softmax objective with logQ correction, and the Accelerate trainer.

Importing this package loads the config, the loss and the frequency estimators only; the loop lives in
``omnisearchsage_hf.training.trainer`` (``from omnisearchsage_hf.training.trainer import Trainer``), so
that publishing and serving, which read a run's files through ``training.run_files``, never load it.
"""

from .config import TaskConfig, TrainingConfig, load_config, parse_overrides
from .frequency import ConditionalFrequencyEstimator, CountMinSketch, FrequencyEstimator
from .losses import SampledSoftmaxLoss
from .multitask import MultiTaskModel
from .tasks import task_batch_sizes

__all__ = [
    "ConditionalFrequencyEstimator",
    "CountMinSketch",
    "FrequencyEstimator",
    "MultiTaskModel",
    "SampledSoftmaxLoss",
    "TaskConfig",
    "TrainingConfig",
    "load_config",
    "parse_overrides",
    "task_batch_sizes",
]
