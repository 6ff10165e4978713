"""Run history: the runs a results store holds, filtered, and two evaluation runs compared
number by number and point by point.

A run is what one command stored at once: one record, or the records of one robustness curve
(one per eps, sharing the record's ``run`` key), named by the id of its first record. Two runs
compare per sample when both stored their per-sample outcomes (schema 2 on) on the same data:
points are matched by their test index (and by eps), so a point one run broke and the other did
not is named, not just counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from .errors import RobustlabError
from .store import ResultStore, Stored

#: Records that are no runs: the demo's timings of its own steps (shown only when asked for).
NOT_RUNS = ("timing",)
#: The kinds whose records carry per-sample outcomes, which ``compare`` compares.
EVALUATIONS = ("eval", "msa")
SHOWN_INDICES = 40  # point indices the text of a comparison lists before it says "more"


@dataclass(frozen=True)
class RunFilter:
    """Which runs to list: each field left None (or empty) lets every run through.

    ``model`` matches a run's label, or its weights' SHA-256 by prefix (4 hex digits or more);
    ``model_shas`` are whole SHA-256 digests (of checkpoints the caller hashed); ``eps`` keeps a
    curve's records at that eps; ``since`` / ``until`` bound the record's creation time (UTC).
    """

    model: str | None = None
    model_shas: tuple[str, ...] = ()
    kind: str | None = None
    norm: str | None = None
    eps: float | None = None
    attack: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class RunRecord:
    """One record of a run: its id, eps and numbers, and how many per-sample outcomes it has."""

    id: int
    eps: float | None
    n: int | None
    clean_accuracy: float | None
    robust_accuracy: float | None
    samples: int


@dataclass(frozen=True)
class Run:
    """A stored run: what it evaluated (model, data, attack, threat model) and its records."""

    id: int
    created: str
    kind: str
    label: str | None
    model_sha: str
    arch: str
    model_path: str
    data: str
    attack: str
    norm: str
    records: tuple[RunRecord, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    @property
    def name(self) -> str:
        """How the run is named in sentences: its id, label and model hash."""
        what = " ".join(p for p in (self.label or "", self.model_sha[:8]) if p)
        return f"run {self.id}" + (f" ({what})" if what else "")


def _text(obj: Any, *keys: str) -> str:
    """A nested string field of a record ('' where absent or not a string)."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj if isinstance(obj, str) else ""


def _number(obj: Any, *keys: str) -> float | None:
    """A nested numeric field of a record (None where absent or not a number)."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(obj, bool) or not isinstance(obj, int | float):
        return None
    return float(obj)


def _run_record(entry: Stored) -> RunRecord:
    """The numbers of one stored record (a training manifest gives its clean accuracy)."""
    rec = entry.record
    clean = _number(rec, "clean_accuracy")
    n = _number(rec, "n")
    if rec.get("kind") == "train":
        clean = _number(rec, "metrics", "clean_accuracy")
        n = _number(rec, "metrics", "test_samples")
    return RunRecord(
        id=entry.id,
        eps=_number(rec, "threat_model", "eps"),
        n=None if n is None else int(n),
        clean_accuracy=clean,
        robust_accuracy=_number(rec, "robust_accuracy"),
        samples=entry.samples,
    )


def _run(entries: Sequence[Stored]) -> Run:
    """The run the entries (one run's records, oldest first) make."""
    first = entries[0]
    rec = first.record
    return Run(
        id=first.run,
        created=_text(rec, "created"),
        kind=_text(rec, "kind") or "eval",
        label=first.label,
        model_sha=_text(rec, "model", "sha256") or _text(rec, "weights", "sha256"),
        arch=_text(rec, "model", "arch"),
        model_path=_text(rec, "model", "path"),
        data=_text(rec, "data") or _text(rec, "dataset", "name"),
        attack=_text(rec, "attack", "name"),
        norm=_text(rec, "threat_model", "norm"),
        records=tuple(_run_record(e) for e in entries),
    )


def _grouped(entries: Iterable[Stored]) -> list[Run]:
    """Entries grouped into runs, in the order of their first records."""
    runs: dict[int, list[Stored]] = {}
    for entry in entries:
        runs.setdefault(entry.run, []).append(entry)
    return [_run(group) for group in runs.values()]


def parse_when(text: str, option: str, *, end: bool = False) -> datetime:
    """A date (YYYY-MM-DD: the day's start, or with ``end`` its end) or an ISO date and time,
    in UTC unless it names its zone; one sentence for anything else."""
    try:
        if len(text.strip()) == 10:
            day = date.fromisoformat(text.strip())
            moment = datetime.combine(day, time.min, tzinfo=timezone.utc)
            return moment + timedelta(days=1) - timedelta(microseconds=1) if end else moment
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise RobustlabError(
            f"{option} takes a date (2025-01-31) or a date and time (2025-01-31T14:00), "
            f"got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _created(entry: Stored) -> datetime | None:
    """When a record was made (None when it does not say)."""
    try:
        moment = datetime.fromisoformat(_text(entry.record, "created"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _eps(entry: Stored) -> float | None:
    """A stored record's eps (None when it has no threat model)."""
    return _number(entry.record, "threat_model", "eps")


def _eps_list(entries: Iterable[Stored]) -> str:
    """The eps of records, as a comma-separated list."""
    return ", ".join("-" if (e := _eps(x)) is None else f"{e:g}" for x in entries)


def _same_eps(a: float | None, b: float | None) -> bool:
    """Whether two budgets are the same number (as typed and as stored)."""
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _is_sha_prefix(text: str) -> bool:
    """Whether ``--model`` can be the start of a SHA-256 digest."""
    return 4 <= len(text) <= 64 and all(c in "0123456789abcdef" for c in text.lower())


def _kept(entry: Stored, f: RunFilter) -> bool:
    """Whether a record passes the filter."""
    rec = entry.record
    kind = _text(rec, "kind") or "eval"
    if (kind in NOT_RUNS and f.kind is None) or (f.kind is not None and kind != f.kind):
        return False
    if f.model is not None or f.model_shas:
        sha = (_text(rec, "model", "sha256") or _text(rec, "weights", "sha256")).lower()
        named = f.model is not None and (
            entry.label == f.model or (_is_sha_prefix(f.model) and sha.startswith(f.model.lower()))
        )
        if not named and sha not in f.model_shas:
            return False
    if f.norm is not None and _text(rec, "threat_model", "norm") != f.norm.lower():
        return False
    if f.eps is not None and not _same_eps(_number(rec, "threat_model", "eps"), f.eps):
        return False
    if f.attack is not None and _text(rec, "attack", "name") != f.attack.lower():
        return False
    if f.since is not None or f.until is not None:
        moment = _created(entry)
        if moment is None or (f.since is not None and moment < f.since):
            return False
        if f.until is not None and moment > f.until:
            return False
    return True


def list_runs(store: ResultStore, where: RunFilter | None = None) -> list[Run]:
    """The store's runs (oldest first) whose records pass the filter, each with the records
    that do (the demo's step timings only when ``kind`` asks for them)."""
    chosen = where or RunFilter()
    return _grouped(e for e in store.entries() if _kept(e, chosen))


# -- comparing two runs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Moved:
    """One number of both runs: A's, B's (None where a run has no such number)."""

    what: str
    a: float | None
    b: float | None

    @property
    def change(self) -> float | None:
        """B minus A (None unless both have it)."""
        return None if self.a is None or self.b is None else self.b - self.a


@dataclass(frozen=True)
class EpsComparison:
    """The two runs at one eps, on their shared points: robust accuracy and the numbers after
    each attack or stage, and which points each broke that the other did not."""

    eps: float
    numbers: tuple[Moved, ...]
    broken_in_a_only: tuple[int, ...]  # not robust in A, robust in B
    broken_in_b_only: tuple[int, ...]
    broken_in_both: int
    robust_in_both: int


@dataclass(frozen=True)
class Comparison:
    """Two runs compared on the test points both evaluated (matched by index) and the eps both
    ran; ``notes`` say what was left out and why."""

    a: Run
    b: Run
    data: str
    points: tuple[int, ...]
    clean: Moved
    wrong_in_a_only: tuple[int, ...]  # misclassified without attack by A, right in B
    wrong_in_b_only: tuple[int, ...]
    per_eps: tuple[EpsComparison, ...]
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (every index list whole; each number with its change)."""
        d = asdict(self)
        d["clean"]["change"] = self.clean.change
        for eps, cmp in zip(d["per_eps"], self.per_eps, strict=True):
            for number, moved in zip(eps["numbers"], cmp.numbers, strict=True):
                number["change"] = moved.change
        return {"kind": "compare", **d}


def _evaluation(store: ResultStore, run_id: int) -> list[Stored]:
    """The records of an evaluation run with per-sample outcomes; one sentence otherwise."""
    entries = store.run_of(run_id)
    if not entries:
        raise RobustlabError(
            f"results store {store.path} has no run {run_id} (robustlab runs --store "
            f"{store.path} lists them)"
        )
    kind = _text(entries[0].record, "kind") or "eval"
    if kind not in EVALUATIONS:
        raise RobustlabError(
            f"run {run_id} is a {kind} record; compare compares evaluations (eval and msa runs)"
        )
    if not store.has_samples:
        raise RobustlabError(
            f"results store {store.path} is of schema version {store.version}, which kept no "
            "per-sample outcomes, so compare cannot say which points each run broke (a "
            "robustlab command that writes to the store upgrades it; runs stored after that "
            "compare)"
        )
    if any(e.samples == 0 for e in entries):
        raise RobustlabError(
            f"run {entries[0].run} has no per-sample outcomes (it was stored before the store "
            "kept them), so compare cannot say which points it broke; evaluate it again with "
            "--store to compare it"
        )
    return entries


def _at_eps(entries: list[Stored], eps: float | None, run_id: int) -> list[Stored]:
    """A run's records at the asked eps (all of them when None)."""
    if eps is None:
        return entries
    kept = [e for e in entries if _same_eps(_eps(e), eps)]
    if not kept:
        raise RobustlabError(
            f"run {run_id} has no record at eps {eps:g} (its eps: {_eps_list(entries)})"
        )
    return kept


def spans(indices: Iterable[int]) -> str:
    """Point indices as ranges: 0-99, 120, 130-131."""
    out: list[str] = []
    ordered = sorted(set(indices))
    start = prev = None
    for i in [*ordered, None]:
        if i is not None and prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    return ", ".join(out)


def _threat(run: Run, entries: Sequence[Stored]) -> str:
    """A run's threat model in words: norm and its eps."""
    return f"{run.norm or 'no norm'} eps {_eps_list(entries)}"


def _steps(record: dict[str, Any]) -> list[tuple[str, float]]:
    """The robust accuracy after each attack (eval) or each stage and member (msa), in order."""
    out: list[tuple[str, float]] = []
    if record.get("kind") == "msa":
        plain = _number(record, "plain_robust_accuracy")
        if plain is not None:
            out.append(("plain AutoAttack robust accuracy", plain))
        lists = [("stage", record.get("stages")), ("attack", record.get("per_attack"))]
    else:
        lists = [("attack", record.get("per_attack"))]
    for key, steps in lists:
        for step in steps if isinstance(steps, list) else []:
            after = _number(step, "robust_accuracy_after")
            name = step.get(key) if isinstance(step, dict) else None
            if isinstance(name, str) and after is not None:
                out.append((f"after {key} {name}", after))
    return out


def _step_numbers(a: dict[str, Any], b: dict[str, Any]) -> list[Moved]:
    """Each run's numbers after every attack or stage, matched by name (A's order first)."""
    sa, sb = dict(_steps(a)), dict(_steps(b))
    names = [*sa, *(n for n in sb if n not in sa)]
    return [Moved(n, sa.get(n), sb.get(n)) for n in names]


def compare_runs(
    store: ResultStore, run_a: int, run_b: int, *, eps: float | None = None
) -> Comparison:
    """Compare two evaluation runs (ids as ``list_runs`` gives them; ``eps`` keeps one eps):
    the numbers that moved and the points each broke that the other did not, on the points both
    evaluated and the eps both ran. Runs on different data are refused; runs without a shared
    threat model are compared on their clean outcomes alone (a note says so)."""
    ea = _at_eps(_evaluation(store, run_a), eps, run_a)
    eb = _at_eps(_evaluation(store, run_b), eps, run_b)
    a, b = _run(ea), _run(eb)
    if a.data != b.data:
        raise RobustlabError(
            f"{a.name} was evaluated on {a.data or 'unnamed data'} and {b.name} on "
            f"{b.data or 'unnamed data'}: their points are different images, so they do not "
            "compare"
        )
    rows = store.samples([e.id for e in (*ea, *eb)])
    by_point = {rid: {int(r["index"]): r for r in got} for rid, got in rows.items()}
    pa, pb = by_point[ea[0].id], by_point[eb[0].id]
    shared = sorted(set(pa) & set(pb))
    if not shared:
        raise RobustlabError(
            f"{a.name} evaluated points {spans(pa)} and {b.name} points {spans(pb)}: they share "
            "no test point to compare"
        )
    for i in shared:
        if pa[i]["label"] != pb[i]["label"]:
            raise RobustlabError(
                f"point {i} is labelled {pa[i]['label']} in {a.name} and {pb[i]['label']} in "
                f"{b.name}: both name their data {a.data}, but it is not the same data"
            )
    notes: list[str] = []
    same_points = set(pa) == set(pb)
    if not same_points:
        notes.append(
            f"{a.name} evaluated points {spans(pa)} and {b.name} points {spans(pb)}: compared on "
            f"the {len(shared)} points both evaluated, which is sound as each point's outcome is "
            "its own; the numbers after each attack, stored over each run's own points, are left "
            "out"
        )
    ca = [pa[i]["clean_pred"] == pa[i]["label"] for i in shared]
    cb = [pb[i]["clean_pred"] == pb[i]["label"] for i in shared]
    clean = Moved("clean accuracy", sum(ca) / len(shared), sum(cb) / len(shared))
    pairs: list[tuple[Stored, Stored]] = []
    if a.norm == b.norm:
        pairs = [(x, y) for x in ea for y in eb if _same_eps(_eps(x), _eps(y))]
    if not pairs:
        notes.append(
            f"the runs share no threat model ({a.name}: {_threat(a, ea)}; {b.name}: "
            f"{_threat(b, eb)}), so their robust outcomes are not compared, only their clean ones"
        )
    else:
        alone = [
            f"{run.name} also ran eps {_eps_list(own)}"
            for run, own in (
                (a, [e for e in ea if all(e is not x for x, _ in pairs)]),
                (b, [e for e in eb if all(e is not y for _, y in pairs)]),
            )
            if own
        ]
        if alone:
            notes.append(
                "; ".join(alone) + ", which the other did not: compared at the eps both ran"
            )
    per_eps = []
    for x, y in pairs:
        ra, rb = by_point[x.id], by_point[y.id]
        broke_a = tuple(i for i in shared if not ra[i]["robust"] and rb[i]["robust"])
        broke_b = tuple(i for i in shared if ra[i]["robust"] and not rb[i]["robust"])
        both = sum(1 for i in shared if not ra[i]["robust"] and not rb[i]["robust"])
        robust = Moved(
            "robust accuracy",
            sum(bool(ra[i]["robust"]) for i in shared) / len(shared),
            sum(bool(rb[i]["robust"]) for i in shared) / len(shared),
        )
        steps = _step_numbers(x.record, y.record) if same_points else []
        per_eps.append(
            EpsComparison(
                eps=float(_eps(x) or 0.0),
                numbers=(robust, *steps),
                broken_in_a_only=broke_a,
                broken_in_b_only=broke_b,
                broken_in_both=both,
                robust_in_both=len(shared) - len(broke_a) - len(broke_b) - both,
            )
        )
    return Comparison(
        a=a,
        b=b,
        data=a.data,
        points=tuple(shared),
        clean=clean,
        wrong_in_a_only=tuple(i for i, x, y in zip(shared, ca, cb, strict=True) if not x and y),
        wrong_in_b_only=tuple(i for i, x, y in zip(shared, ca, cb, strict=True) if x and not y),
        per_eps=tuple(per_eps),
        notes=tuple(notes),
    )


# -- text -----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    """A fraction as a percentage with two decimals ('-' where there is none)."""
    return "-" if value is None else f"{100 * value:.2f}"


def _date(created: str) -> str:
    """A record's creation time as 'YYYY-MM-DD HH:MM' (UTC, as stored)."""
    return created[:16].replace("T", " ") if len(created) >= 16 else created or "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Rows under a header, columns padded to fit (the ``right`` ones right-aligned)."""
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [
            cell.rjust(w) if c in right else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


RUN_COLUMNS = (
    "run", "date (UTC)", "kind", "model", "arch", "data", "attack", "norm", "eps", "n",
    "clean %", "robust %", "per-sample",
)  # fmt: skip


def runs_table(runs: Sequence[Run]) -> str:
    """The runs as a text table: one line per record, a curve's further eps on lines of their
    own under its first."""
    rows: list[list[str]] = []
    for run in runs:
        model = " ".join(p for p in (run.label or "", run.model_sha[:8]) if p) or "-"
        head = [str(run.id), _date(run.created), run.kind, model, run.arch or "-"]
        head += [run.data or "-", run.attack or "-", run.norm or "-"]
        for k, rec in enumerate(run.records):
            left = head if k == 0 else [""] * len(head)
            rows.append(
                [
                    *left,
                    "-" if rec.eps is None else f"{rec.eps:g}",
                    "-" if rec.n is None else str(rec.n),
                    _pct(rec.clean_accuracy),
                    _pct(rec.robust_accuracy),
                    "yes" if rec.samples else "-",
                ]
            )
    return _table(RUN_COLUMNS, rows, right={0, 9, 10, 11})


def _indices(indices: Sequence[int]) -> str:
    """Point indices for the text: all of them, or the first ones and how many more."""
    if len(indices) <= SHOWN_INDICES:
        return ", ".join(map(str, indices))
    more = len(indices) - SHOWN_INDICES
    shown = ", ".join(map(str, indices[:SHOWN_INDICES]))
    return f"{shown}, ... ({more} more; --json lists them all)"


def _moved(m: Moved) -> list[str]:
    """One number's row: what, A, B, change."""
    change = m.change
    text = "-" if change is None else ("=" if abs(change) < 1e-12 else f"{100 * change:+.2f}")
    return [m.what, _pct(m.a), _pct(m.b), text]


def comparison_text(c: Comparison) -> str:
    """A comparison as text: the runs, the numbers (A, B, change in points), the points each
    broke that the other did not, and the notes."""

    def about(run: Run) -> str:
        """One run in a line."""
        attack = f"{run.attack} {run.norm}".strip() or run.kind
        arch = run.arch or "architecture not recorded"
        return f"{run.name}: {run.kind}, {attack}, {arch}, {_date(run.created)}"

    lines = [f"A = {about(c.a)}", f"B = {about(c.b)}"]
    lines.append(f"on {len(c.points)} {c.data} points ({spans(c.points)})")
    lines += [f"note: {note}" for note in c.notes]
    rows = [_moved(c.clean)]
    for e in c.per_eps:
        rows += [[f"eps {e.eps:g}: {r[0]}", *r[1:]] for r in map(_moved, e.numbers)]
    lines += ["", _table(("number", "A %", "B %", "B - A (pp)"), rows, right={1, 2, 3})]
    lines += [
        "",
        f"misclassified without attack by A, not by B: {len(c.wrong_in_a_only)}"
        + (f" [{_indices(c.wrong_in_a_only)}]" if c.wrong_in_a_only else ""),
        f"misclassified without attack by B, not by A: {len(c.wrong_in_b_only)}"
        + (f" [{_indices(c.wrong_in_b_only)}]" if c.wrong_in_b_only else ""),
    ]
    for e in c.per_eps:
        lines += [
            f"eps {e.eps:g}: broken in A, robust in B: {len(e.broken_in_a_only)}"
            + (f" [{_indices(e.broken_in_a_only)}]" if e.broken_in_a_only else ""),
            f"eps {e.eps:g}: broken in B, robust in A: {len(e.broken_in_b_only)}"
            + (f" [{_indices(e.broken_in_b_only)}]" if e.broken_in_b_only else ""),
            f"eps {e.eps:g}: broken in both: {e.broken_in_both}, robust in both: "
            f"{e.robust_in_both}",
        ]
    return "\n".join(lines)
