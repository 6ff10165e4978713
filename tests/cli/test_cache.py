"""The model cache key names the training that actually runs, recipe defaults included."""

from __future__ import annotations

import pytest

import robustlab.train.loop as loop
from robustlab.train import TrainConfig
from robustlab.train.cache import config_key
from robustlab.train.recipes import recipe_for


def test_implicit_and_explicit_recipe_defaults_share_a_key() -> None:
    epochs = recipe_for("standard")["epochs"]
    assert config_key(TrainConfig(arch="resnet8")) == config_key(
        TrainConfig(arch="resnet8", epochs=epochs)
    )
    assert config_key(TrainConfig(arch="resnet8")) != config_key(
        TrainConfig(arch="resnet8", epochs=epochs + 1)
    )


def test_a_changed_recipe_changes_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    before = config_key(TrainConfig(arch="resnet8"))
    original = recipe_for

    def longer(method: str) -> dict[str, object]:
        recipe = dict(original(method))
        recipe["epochs"] = int(recipe["epochs"]) + 5
        return recipe

    monkeypatch.setattr(loop, "recipe_for", longer)
    assert config_key(TrainConfig(arch="resnet8")) != before
