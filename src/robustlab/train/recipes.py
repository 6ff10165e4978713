"""Default training recipes per method: what a user gets from arch, data, method and eps alone."""

from __future__ import annotations

from typing import Any

from ..errors import RobustlabError

RECIPES: dict[str, dict[str, Any]] = {
    "standard": {"epochs": 10, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4},
    "pgd-at": {
        "epochs": 20,
        "batch_size": 128,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "steps": 10,
        "eps_warmup_epochs": 3,
    },
    "trades": {
        "epochs": 20,
        "batch_size": 128,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "steps": 10,
        "eps_warmup_epochs": 3,
    },
}


def recipe_for(method: str) -> dict[str, Any]:
    """The default hyper-parameters of a training method."""
    try:
        return dict(RECIPES[method])
    except KeyError:
        raise RobustlabError(
            f"unknown training method '{method}'; use one of {', '.join(RECIPES)}"
        ) from None
