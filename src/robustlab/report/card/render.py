"""A model card (``ModelCard``) as a document of headings, paragraphs, tables,
lists and command blocks, written as Markdown or as self-contained HTML in the report's style.

Text may mark code with backticks (`robustlab eval ...`): Markdown keeps them, HTML turns
them into ``<code>``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...io import atomic_write_text, starts_with
from ...version import __version__
from ..html import CSS, GENERATOR
from .build import ModelCard
from .evals import Protocol, RobustRow, Stage
from .text import pct, plural, span, threat_text, value_text

#: The first line of every Markdown card robustlab writes (how a card is recognised as ours).
MARKDOWN_MARKER = "<!-- robustlab model card"
is_markdown_card = starts_with(MARKDOWN_MARKER.encode())
CARD_CSS = """
body{max-width:1100px} td{vertical-align:top} td.n{white-space:nowrap}
td.l{overflow-wrap:break-word} td.k{color:#445;background:#fafbfd}
h3{font-size:1.02em;margin-top:1.3em} code{font-size:.92em}
pre{background:#f4f6fa;border:1px solid #dde;padding:.6em .8em;overflow-x:auto;font-size:.86em}
ul.warns{padding-left:0} .warn{background:#fff6e6;border-left:4px solid #e0a030;margin:.4em 0;
padding:.35em .8em;list-style:none}
.note{background:#eef4ff;border-left:4px solid #5b8def;padding:.35em .8em}
"""


@dataclass(frozen=True)
class Heading:
    """A section heading (level 1 to 3)."""

    text: str
    level: int


@dataclass(frozen=True)
class Para:
    """A paragraph; ``style`` "muted" (an explanation), "note" (stands out) or ""."""

    text: str
    style: str = ""


@dataclass(frozen=True)
class Table:
    """A table: its first ``left`` columns are text (left-aligned), the others numbers."""

    header: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]
    left: int = 1
    keys: int = 0  # key/value pairs per line: their key columns are shaded in HTML


@dataclass(frozen=True)
class Items:
    """A bulleted list; ``warn``: each item is a warning."""

    items: list[str]
    warn: bool = False


@dataclass(frozen=True)
class Code:
    """Command lines, shown as a block to copy."""

    lines: list[str]


Block = Heading | Para | Table | Items | Code


# -- the document -----------------------------------------------------------------------------


#: A key/value table longer than this, with short values, is laid out as two pairs per line.
KV_FOLD = 8
SHORT = 28


def _kv(rows: Sequence[tuple[str, str]], header: tuple[str, str] = ("", "")) -> Table:
    """A key/value table; a long one of short values as two pairs per line (read down the
    first pair, then the second) so it does not run down the page."""
    if len(rows) <= KV_FOLD or any(len(v) > SHORT for _, v in rows):
        return Table(header, [tuple(r) for r in rows], left=2, keys=1)
    half = (len(rows) + 1) // 2
    left, right = rows[:half], [*rows[half:], ("", "")]
    lines = [(*a, *b) for a, b in zip(left, right, strict=False)]
    return Table((*header, *header), lines, left=4, keys=2)


def _intro(card: ModelCard) -> list[Block]:
    """What the card was written from, and the plain statement when nothing was stored."""
    total = sum(card.matched.values())
    if total:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(card.matched.items()))
        labels = f", stored as {', '.join(card.labels)}" if card.labels else ""
        carry = "carries" if total == 1 else "carry"
        text = (
            f"Written by robustlab {card.robustlab_version} on {card.generated[:10]} from the "
            f"results store `{card.store}`: {plural(total, 'stored record')} {carry} this "
            f"model's weights SHA-256 ({kinds}{labels}). Every number comes from those records "
            "or from the model's own manifest; nothing was measured to write this card."
        )
        return [Para(text, "muted")]
    why = (
        "the model has no weights hash, so no record can be tied to it"
        if not card.sha256
        else f"no record carries its weights SHA-256 {card.sha256[:16]}…"
    )
    return [
        Para(
            f"Written by robustlab {card.robustlab_version} on {card.generated[:10]} from the "
            f"model's manifest only; the results store `{card.store}` holds no results of this "
            f"model ({why}).",
            "muted",
        ),
        Para(
            f"No results of this model are stored. Produce them with `{card.suggest}` "
            "(and transfer, slowdown or compressibility results with robustlab transfer, "
            "sloth or compress and --store), then write this card again.",
            "note",
        ),
    ]


def _summary(card: ModelCard) -> list[Block]:
    """The headline numbers: clean and strongest robust accuracy per threat model."""
    if not card.summary:
        return []
    rows = [
        (
            s.data,
            threat_text(s.norm, s.eps),
            s.attack + ("" if s.autoattack_grade else " *"),
            pct(s.clean_accuracy),
            pct(s.robust_accuracy),
            str(s.n),
            s.row,
        )
        for s in card.summary
    ]
    head = ("data", "threat model", "strongest attack stored", "clean", "robust", "points", "row")
    blocks: list[Block] = [Heading("Summary", 2), Table(head, rows, left=3)]
    note = (
        "Per threat model, the lowest robust accuracy stored: the strongest attack found. "
        "* not AutoAttack-grade: an upper bound on robust accuracy."
    )
    if card.warnings:
        note += f" {plural(len(card.warnings), 'gradient-masking warning')}: see below."
    blocks.append(Para(note, "muted"))
    return blocks


def _model(card: ModelCard) -> list[Block]:
    """What the model is, and what it was made from."""
    blocks: list[Block] = [Heading("Model", 2), _kv(card.identity)]
    if card.derived_from:
        blocks += [Para("Made from:"), _kv(card.derived_from)]
    return blocks


def _recipe(card: ModelCard) -> list[Block]:
    """Data and training recipe, as the manifest states them."""
    blocks: list[Block] = [Heading("Data and training recipe", 2)]
    if card.dataset:
        blocks.append(_kv(card.dataset))
    if not card.recipe:
        blocks.append(Para("The manifest states no training recipe.", "muted"))
    for title, rows in card.recipe:
        blocks += [Heading(title[:1].upper() + title[1:], 3), _kv(rows)]
    if card.stated:
        blocks += [
            Heading("Numbers the manifest states", 3),
            Para(
                "Measured when the checkpoint was written, on the data named above; not a "
                "stored result.",
                "muted",
            ),
            _kv(card.stated),
        ]
    return blocks


def _clean(card: ModelCard) -> list[Block]:
    """Clean accuracy as measured by the evaluations and stated by the manifest."""
    blocks: list[Block] = [Heading("Clean accuracy", 2)]
    if not card.clean:
        return blocks + [Para("No clean accuracy is stored or stated.", "muted")]
    rows = [(c.data, c.source, str(c.n), pct(c.accuracy)) for c in card.clean]
    return blocks + [Table(("data", "measured by", "points", "clean accuracy"), rows, left=2)]


def _row(r: RobustRow) -> tuple[str, ...]:
    """One line of the robust-accuracy table."""
    lo, hi = r.interval
    return (
        r.id,
        threat_text(r.norm, r.eps),
        r.attack,
        r.grade,
        r.protocol,
        str(r.n),
        pct(r.clean_accuracy),
        pct(r.robust_accuracy),
        f"{100 * lo:.1f}–{100 * hi:.1f} %",
        r.created[:10] or "–",
    )


def _stage_table(stages: list[Stage], what: str) -> Table:
    """Robust accuracy after each member or stage, points it broke, its time."""
    rows = [
        (s.name, pct(s.robust_accuracy_after), str(s.broken), f"{s.seconds:.1f} s") for s in stages
    ]
    return Table((f"after {what}", "robust accuracy", "broken", "time"), rows)


def _protocol(p: Protocol) -> list[Block]:
    """One protocol: its settings, the attack configuration, the commands that ran it."""
    blocks: list[Block] = [
        Heading(
            f"Protocol {p.id}: {p.title} ({'row' if len(p.rows) == 1 else 'rows'} {span(p.rows)})",
            3,
        ),
        _kv(p.settings, ("setting", "value")),
        Para("Attack configuration:"),
        _kv(p.attack_config, p.attack_header),
    ]
    if p.commands:
        blocks.append(Code(p.commands))
    else:
        blocks.append(Para("The records carry no command line.", "muted"))
    return blocks


def _robust(card: ModelCard) -> list[Block]:
    """Every stored robust accuracy, its protocol in full, per-stage numbers."""
    blocks: list[Block] = [Heading("Robust accuracy", 2)]
    if not card.robust:
        if not card.matched:  # the note under the title already says how to produce them
            return blocks + [Para("None stored.", "muted")]
        return blocks + [Para(f"None stored. Produce one with `{card.suggest}`.", "note")]
    header = (
        "row", "threat model", "attack", "grade", "protocol", "points", "clean", "robust",
        "95 % interval", "date",
    )  # fmt: skip
    blocks += [
        Table(header, [_row(r) for r in card.robust], left=5),
        Para(
            "A point counts as robust only if it is classified correctly both clean and under "
            "attack, with every adversarial example checked to lie within the budget. 95 % "
            "interval: Wilson score interval over the points.",
            "muted",
        ),
    ]
    msa = [r for r in card.robust if r.plain_robust_accuracy is not None]
    if msa:
        blocks.append(
            Items(
                [
                    f"{r.id}: plain AutoAttack alone left {pct(r.plain_robust_accuracy)}, "
                    f"MSA {pct(r.robust_accuracy)}"
                    for r in msa
                ]
            )
        )
    for p in card.protocols:
        blocks += _protocol(p)
    staged = [r for r in card.robust if len(r.stages) > 1 or len(r.members) > 1]
    if staged:
        blocks.append(Heading("Per-stage numbers", 3))
    for r in staged:
        blocks.append(Para(f"{r.id}: {r.attack} at {threat_text(r.norm, r.eps)}, {r.n} points:"))
        if r.stages:
            blocks.append(_stage_table(r.stages, "stage"))
        else:
            blocks.append(_stage_table(r.members, "member"))
    return blocks


def _checks(card: ModelCard) -> list[Block]:
    """Gradient-masking warnings carried by the records and derived from them."""
    blocks: list[Block] = [Heading("Gradient-masking checks", 2)]
    if card.warnings:
        items = []
        for w in card.warnings:
            where = ", ".join(w.rows)
            how = f"carried by {where}" if w.origin == "record" else f"derived from {where}"
            items.append(f"{w.text} ({how})")
        blocks.append(Items(items, warn=True))
    elif card.robust:
        blocks.append(
            Para("No stored record carries a warning, and none could be derived from them.")
        )
    if card.robust:
        blocks.append(Para("Checked: " + "; ".join(card.checks) + ".", "muted"))
    else:
        blocks.append(Para("No evaluation is stored, so nothing could be checked.", "muted"))
    return blocks


def _transfer(card: ModelCard) -> list[Block]:
    """Transfer attacks with this model as source or target."""
    if not card.transfer:
        return []
    rows = [
        (
            t["id"],
            "target" if t["role"] == "target" else "source",
            t["other"] + (" (itself: white-box)" if t["white_box"] else ""),
            t["attack"] + ("" if t["gamma"] is None else f", gamma {t['gamma']:g}"),
            threat_text(t["norm"], t["eps"]),
            str(t["n_all"]),
            pct(t["success_rate"]) + f" of {t['n']}",
            pct(t["adversarial_accuracy"]),
            t["created"][:10],
        )
        for t in card.transfer
    ]
    header = (
        "row", "this model is", "other model", "attack", "threat model", "points",
        "success rate", "target accuracy on the examples", "date",
    )  # fmt: skip
    return [
        Heading("Transfer attacks", 2),
        Table(header, rows, left=5),
        Para(
            "Crafted on the source, evaluated on the target. Success rate: over the points the "
            "target classifies correctly when clean (untargeted: misclassified; targeted: "
            "given the target label).",
            "muted",
        ),
    ]


def _exits(card: ModelCard) -> list[Block]:
    """Early-exit efficiency stated by the manifest, and stored DeepSloth results."""
    if not card.early_exit and not card.sloth:
        return []
    blocks: list[Block] = [Heading("Early exits and DeepSloth", 2)]
    if card.early_exit:
        rows = [
            (
                e["drop"],
                value_text(e["threshold"]),
                str(e["n"]),
                pct(e["accuracy_early_exit"]),
                pct(e["accuracy_final"]),
                pct(e["flops_saving"]),
                value_text(e["efficacy"]),
            )
            for e in card.early_exit
        ]
        head = (
            "calibrated drop", "threshold", "test points", "accuracy (early exit)",
            "accuracy (final exit)", "FLOPs saved", "efficacy",
        )  # fmt: skip
        blocks += [Para("Stated by the manifest (clean test data):"), Table(head, rows)]
    if card.sloth:
        rows = [
            (
                s["variant"],
                threat_text(s["norm"], s["eps"]),
                str(s["n"]),
                f"{value_text(s['efficacy_clean'])} → {value_text(s['efficacy_attacked'])}",
                f"{pct(s['flops_saving_clean'])} → {pct(s['flops_saving_attacked'])}",
                pct(s["accuracy_final_attacked"]),
                s["created"][:10] or "–",
            )
            for s in card.sloth
        ]
        head = (
            "slowdown attack", "threat model", "points", "efficacy clean → attacked",
            "FLOPs saved clean → attacked", "final-exit accuracy attacked", "date",
        )  # fmt: skip
        blocks += [Para("Stored slowdown attacks:"), Table(head, rows, left=2)]
    return blocks


def _compress(card: ModelCard) -> list[Block]:
    """Stored compressibility measurements: the robustness bound against the measured gap."""
    if not card.compress:
        return []
    rows = [
        (
            c["norm"],
            value_text(c["eps"]),
            value_text(c["n"]),
            c["refused"] or value_text(c["bound"]),
            f"{value_text(c['gap_max'])} (mean {value_text(c['gap_mean'])})",
            value_text(c["holds"]),
            f"{pct(c['robust_accuracy'])} ({c['attack']})",
            value_text(c["stable_rank"]),
            c["created"][:10] or "–",
        )
        for c in card.compress
    ]
    head = (
        "norm", "eps", "points", "loss-rise bound", "measured gap max", "bound holds",
        "robust accuracy", "mean stable rank", "date",
    )  # fmt: skip
    return [Heading("Compressibility", 2), Table(head, rows)]


def _uap(card: ModelCard) -> list[Block]:
    """Stored universal perturbations."""
    if not card.uap:
        return []
    rows = [
        (
            u["method"] + (" (per class)" if u["per_class"] else ""),
            threat_text(u["norm"], u["eps"]),
            value_text(u["n"]),
            pct(u["fooling_rate"]),
            pct(u["random_fooling_rate"]),
            pct(u["clean_accuracy"]),
            pct(u["perturbed_accuracy"]),
            u["created"][:10] or "–",
        )
        for u in card.uap
    ]
    head = (
        "method", "threat model", "points", "fooling rate", "random noise", "clean accuracy",
        "perturbed accuracy", "date",
    )  # fmt: skip
    return [Heading("Universal perturbations", 2), Table(head, rows, left=2)]


def _reproducibility(card: ModelCard) -> list[Block]:
    """Versions, the hash that ties the results to the weights, the commands that made them."""
    blocks: list[Block] = [
        Heading("Reproducibility", 2),
        _kv([("weights SHA-256", card.sha256 or "none"), *card.versions]),
    ]
    if card.commands:
        lines = []
        for cmd, what in card.commands:
            lines += [f"# {what}", cmd]
        blocks += [Para("The commands that produced the stored results:"), Code(lines)]
    if card.uncommanded:
        blocks.append(
            Para(
                f"{plural(card.uncommanded, 'stored record')} "
                f"{'carries' if card.uncommanded == 1 else 'carry'} no command line (written "
                "before robustlab recorded the command in every record); their settings are in "
                "the protocols above.",
                "muted",
            )
        )
    blocks.append(
        Para(
            "The manifest states the training recipe (above), not the command line that "
            "trained the model.",
            "muted",
        )
    )
    return blocks


def document(card: ModelCard) -> list[Block]:
    """The card as a sequence of blocks, in reading order."""
    return [
        Heading(card.title, 1),
        *_intro(card),
        *_summary(card),
        *_model(card),
        *_recipe(card),
        *_clean(card),
        *_robust(card),
        *_checks(card),
        *_transfer(card),
        *_exits(card),
        *_compress(card),
        *_uap(card),
        Heading("Known limits", 2),
        Items(card.limits) if card.limits else Para("None found in the stored results."),
        *_reproducibility(card),
    ]


# -- Markdown -------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    """A table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|") or " "


def _md_table(t: Table) -> list[str]:
    """A GitHub-flavoured Markdown table (text columns left, numbers right)."""
    header = t.header if any(t.header) else tuple(" " for _ in t.header)
    align = [":---" if i < t.left else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return lines


def render_markdown(card: ModelCard) -> str:
    """The card as Markdown (GitHub-flavoured tables), its first line marking it robustlab's."""
    out = [f"{MARKDOWN_MARKER}, written by robustlab {__version__} from stored results -->", ""]
    for b in document(card):
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [f"> {b.text}" if b.style == "note" else b.text, ""]
        elif isinstance(b, Table):
            out += [*_md_table(b), ""]
        elif isinstance(b, Items):
            prefix = "- **warning:** " if b.warn else "- "
            out += [prefix + item for item in b.items] + [""]
        else:
            out += ["```sh", *b.lines, "```", ""]
    return "\n".join(out).rstrip() + "\n"


# -- HTML -----------------------------------------------------------------------------------


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html_table(t: Table) -> str:
    """A table in the report's style (text columns left-aligned)."""

    def cell(tag: str, i: int, text: str) -> str:
        """One cell: text columns left-aligned, numbers kept on one line, keys shaded."""
        key = t.keys and tag == "td" and i % 2 == 0 and i < 2 * t.keys
        cls = "l k" if key else "l" if i < t.left else "n"
        return f'<{tag} class="{cls}">{_inline(text)}</{tag}>'

    head = ""
    if any(t.header):
        head = "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(t.header)) + "</tr>"
    body = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in t.rows
    )
    return f"<table>{head}{body}</table>"


def render_html(card: ModelCard) -> str:
    """The card as one self-contained HTML page in the report's style."""
    parts = []
    for b in document(card):
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = f' class="{b.style}"' if b.style else ""
            parts.append(f"<p{cls}>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            parts.append(_html_table(b))
        elif isinstance(b, Items):
            if b.warn:
                items = "".join(f"<li class=warn>{_inline(i)}</li>" for i in b.items)
                parts.append(f"<ul class=warns>{items}</ul>")
            else:
                parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        else:
            parts.append("<pre><code>" + html.escape("\n".join(b.lines)) + "</code></pre>")
    generator = GENERATOR.decode()
    return (
        f'<!doctype html><html lang=en><head><meta charset=utf-8>{generator} {__version__}">'
        f"<title>{html.escape(card.title)}</title><style>{CSS}{CARD_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )


def card_format(path: str | Path, given: str | None) -> str:
    """The format of a card file: ``given`` (md or html), else the file's suffix; None when
    neither says (the caller states the error)."""
    if given:
        return given
    suffix = Path(path).suffix.lower()
    return {".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}.get(suffix, "")


def write_card(card: ModelCard, out: str | Path, fmt: str) -> Path:
    """Write the card as Markdown (``fmt`` "md") or HTML ("html"), atomically."""
    text = render_html(card) if fmt == "html" else render_markdown(card)
    atomic_write_text(out, text)
    return Path(out)
