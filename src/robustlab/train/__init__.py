"""Training: one loop with hooks around the step, batches from a sampler, methods as registered
strategies (standard, PGD-AT, TRADES, MART, fast and free AT, SDN exits, HPM fine-tuning), the
held-out robustness check (early stopping, catastrophic overfitting), default recipes."""

from .heldout import DEFAULT_HOLDOUT, HeldOutCheck, robust_accuracy
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
    training_splits,
)
from .methods import (
    METHODS,
    PGDAT,
    TRADES,
    AdversarialMethod,
    EpochEnd,
    FastAT,
    FreeAT,
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
    "DEFAULT_HOLDOUT",
    "METHODS",
    "PGDAT",
    "RECIPES",
    "TRADES",
    "AdversarialMethod",
    "Diverged",
    "EpochEnd",
    "EpochSampler",
    "FastAT",
    "FreeAT",
    "HPMAdversarial",
    "HPMTrainConfig",
    "HeldOutCheck",
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
    "robust_accuracy",
    "train",
    "training_splits",
]
