"""Model cards: what a model is, how it was trained and how robust it measured, written from
stored results only.

The facts come from two places and nowhere else: the results store's records that carry the
model's weights SHA-256 (``records``), and the checkpoint's own manifest, the model's
statement of its recipe (``manifest``). Nothing is measured while a card is written.
``build_card`` gathers the facts into a ``ModelCard`` (the evaluations and their protocols:
``evals``; gradient-masking warnings: ``checks``; other results: ``results``; known limits and
reproducibility: ``limits``); ``render`` writes it as Markdown or HTML.
"""

from __future__ import annotations

from .build import ModelCard, build_card
from .render import card_format, is_markdown_card, render_html, render_markdown, write_card

__all__ = [
    "ModelCard",
    "build_card",
    "card_format",
    "is_markdown_card",
    "render_html",
    "render_markdown",
    "write_card",
]
