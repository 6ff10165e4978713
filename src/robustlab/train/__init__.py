"""Training: one loop, methods as strategies (standard, PGD-AT, TRADES), default recipes."""

from .loop import TrainConfig, TrainResult, accuracy, lr_at, train
from .methods import METHODS, PGDAT, TRADES, Method, Standard, make_method
from .recipes import RECIPES, recipe_for

__all__ = [
    "METHODS",
    "PGDAT",
    "RECIPES",
    "TRADES",
    "Method",
    "Standard",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "lr_at",
    "make_method",
    "recipe_for",
    "train",
]
