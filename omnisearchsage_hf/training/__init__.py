"""Training: the multi-task sampled-softmax objective with logQ correction, data, and the Accelerate trainer."""

from .config import TaskConfig, TrainingConfig, load_config, parse_overrides
from .frequency import ConditionalFrequencyEstimator, CountMinSketch, FrequencyEstimator
from .losses import SampledSoftmaxLoss
from .multitask import MultiTaskModel
from .synthetic import SyntheticWorldConfig, generate_world
from .tasks import task_batch_sizes
from .trainer import Trainer

__all__ = [
    "ConditionalFrequencyEstimator",
    "CountMinSketch",
    "FrequencyEstimator",
    "MultiTaskModel",
    "SampledSoftmaxLoss",
    "SyntheticWorldConfig",
    "TaskConfig",
    "Trainer",
    "TrainingConfig",
    "generate_world",
    "load_config",
    "parse_overrides",
    "task_batch_sizes",
]
