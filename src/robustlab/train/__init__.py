"""Training: one loop with hooks around the step, batches from a sampler, methods as registered
strategies (standard, PGD-AT, TRADES, SDN exits, HPM fine-tuning), default recipes."""

from .hpm import HPMAdversarial, HPMTrainConfig, finetune_hpm
from .loop import (
    Diverged,
    EpochSampler,
    TrainConfig,
    TrainResult,
    accuracy,
    fit,
    lr_at,
    train,
)
from .methods import (
    METHODS,
    PGDAT,
    TRADES,
    EpochEnd,
    Hook,
    Method,
    Standard,
    Step,
    make_method,
    register_method,
    require_finite,
)
from .recipes import RECIPES, recipe_for

__all__ = [
    "METHODS",
    "PGDAT",
    "RECIPES",
    "TRADES",
    "Diverged",
    "EpochEnd",
    "EpochSampler",
    "HPMAdversarial",
    "HPMTrainConfig",
    "Hook",
    "Method",
    "Standard",
    "Step",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "finetune_hpm",
    "fit",
    "lr_at",
    "make_method",
    "recipe_for",
    "register_method",
    "require_finite",
    "train",
]
