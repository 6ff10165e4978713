"""What the tests marked ``foreign`` share: importing torchvision or timm, or skipping the
module with the reason when they are not here (README.md, 'Your own model')."""

from __future__ import annotations

from typing import Any

import pytest


def library(name: str) -> Any:
    """The library, or a skip of the calling module saying why it is not here."""
    try:
        return __import__(name)
    except Exception as exc:  # not installed, or built for another torch
        pytest.skip(
            f"{name} does not import here ({type(exc).__name__}): run pytest -m foreign in a "
            "venv with torchvision and timm (README.md, 'Your own model')",
            allow_module_level=True,
        )
