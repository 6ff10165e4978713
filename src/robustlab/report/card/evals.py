"""The evaluations on a model card: one row per stored robust accuracy, the protocols they
ran under (the attack and its configuration as a table, points, seed, versions, engine,
commands), the headline numbers and the clean accuracy."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..attack_spec import describe_attack
from .text import Rows, eps_text, span, value_text, wilson

#: Attacks that only query the model's outputs (no gradient).
BLACK_BOX = ("square",)
#: Readable names of attack options; options not named here are shown with spaces for "_".
OPTION_NAMES = {
    "alpha": "step size",
    "alpha_max": "largest step (alpha_max)",
    "decay": "momentum decay",
    "diversity_prob": "input-diversity probability",
    "early_stop": "early stop",
    "eot_iter": "EOT samples",
    "large_eps": "l1 large-eps schedule",
    "n_target_classes": "target classes",
    "p_init": "initial square fraction (p_init)",
    "random_start": "random start",
    "rescale_schedule": "rescaled schedule",
    "resize_rate": "resize rate",
    "step_size": "step size",
    "ti_kernel": "translation kernel",
    "ti_sigma": "translation sigma",
}


@dataclass(frozen=True)
class Stage:
    """One member or stage of an ensemble evaluation: robust accuracy after it."""

    name: str
    robust_accuracy_after: float
    broken: int
    seconds: float


@dataclass(frozen=True)
class RobustRow:
    """One stored robust-accuracy measurement of the model (one eval or msa record)."""

    id: str
    protocol: str
    kind: str
    data: str
    norm: str
    eps: float
    attack: str
    grade: str
    autoattack_grade: bool
    gradient_free: bool
    n: int
    clean_accuracy: float
    robust_accuracy: float
    interval: tuple[float, float]
    created: str
    label: str | None
    plain_robust_accuracy: float | None = None
    stages: list[Stage] = field(default_factory=list)
    members: list[Stage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    command: str | None = None


@dataclass(frozen=True)
class Protocol:
    """What the evaluations of some rows shared, except the eps: the attack and its
    configuration, the points, seed, versions, engine and the commands that ran them."""

    id: str
    title: str
    rows: list[str]
    settings: Rows
    attack_header: tuple[str, str]
    attack_config: Rows
    commands: list[str]


@dataclass(frozen=True)
class CleanRow:
    """Clean accuracy on some points, as stored evaluations (or the manifest) state it."""

    data: str
    n: int
    accuracy: float
    source: str


@dataclass(frozen=True)
class SummaryRow:
    """Per data and threat model: the lowest stored robust accuracy (the strongest attack
    found), the row that gave it and whether it is AutoAttack-grade."""

    data: str
    norm: str
    eps: float
    clean_accuracy: float
    robust_accuracy: float
    row: str
    attack: str
    autoattack_grade: bool
    n: int


def members(config: dict[str, Any]) -> list[str]:
    """The sub-attacks of an AutoAttack configuration (of an MSA record: its AutoAttack's)."""
    aa = config.get("autoattack") if config.get("name") == "msa" else config
    return [str(a) for a in (aa or {}).get("attacks") or []]


def attack_title(config: dict[str, Any]) -> str:
    """A readable name of a stored attack configuration: 'PGD-20, 5 restarts',
    'AutoAttack standard (apgd-ce, apgd-t, fab-t, square)', 'MSA: AutoAttack ... + 5
    surrogates'."""
    name = str(config.get("name", "?"))
    if name == "msa":
        surrogates = len(config.get("surrogates") or [])
        return f"MSA: {attack_title(config.get('autoattack') or {})} + {surrogates} surrogates"
    if name == "autoattack":
        return f"AutoAttack {config.get('version', 'standard')} ({', '.join(members(config))})"
    title = name.upper() if len(name) <= 5 else name
    if isinstance(config.get("steps"), int):
        title += f"-{config['steps']}"
    restarts = config.get("restarts")
    if isinstance(restarts, int) and restarts > 1:
        title += f", {restarts} restarts"
    loss = config.get("loss")
    if loss and loss != "ce" and name in ("pgd", "apgd", "bim"):
        title += f", {loss} loss"
    return title


def grade(config: dict[str, Any]) -> tuple[str, bool]:
    """How far an evaluation can be trusted: (its grade in words, AutoAttack-grade); the grade
    is the report's (``describe_attack``), so card and leaderboard agree on what counts."""
    spec = describe_attack(config)
    if spec.grade is not None:
        version = config.get("version") or (config.get("autoattack") or {}).get("version")
        words = "MSA, full AutoAttack" if spec.grade == "MSA" else spec.name
        if version == "rand":
            words += " (EOT, for randomised defences)"
        return words, True
    if config.get("name") in ("msa", "autoattack"):
        return (
            "MSA, part of AutoAttack" if config.get("name") == "msa" else "part of AutoAttack"
        ), False
    return "single attack", False


def gradient_free(config: dict[str, Any]) -> bool:
    """Whether an evaluation used only query (black-box) attacks."""
    if config.get("name") in BLACK_BOX:
        return True
    found = members(config)
    return config.get("name") == "autoattack" and bool(found) and set(found) <= set(BLACK_BOX)


def _stages(items: Any, key: str) -> list[Stage]:
    """Stage rows from a record's ``per_attack`` (key "attack") or ``stages`` ("stage")."""
    return [
        Stage(
            str(s.get(key, "?")),
            float(s.get("robust_accuracy_after", 0.0)),
            int(s.get("broken", 0)),
            float(s.get("seconds", 0.0)),
        )
        for s in items or []
        if isinstance(s, dict)
    ]


def _without_eps(config: dict[str, Any], eps: float) -> dict[str, Any]:
    """An attack configuration with its eps taken out and its step size as a multiple of
    eps, so the evaluations of one robustness curve share one protocol."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "eps":
            continue
        if isinstance(value, dict):
            out[key] = _without_eps(value, eps)
        elif key in ("alpha", "step_size") and isinstance(value, (int, float)) and eps > 0:
            out[key] = {"times_eps": round(float(value) / eps, 4)}
        else:
            out[key] = value
    return out


def _protocol_key(r: dict[str, Any]) -> str:
    """What identifies a protocol: everything an evaluation depends on except its eps."""
    tm = r["threat_model"]
    model = r.get("model") or {}
    key = {
        "kind": r.get("kind"),
        "data": r.get("data"),
        "n": r.get("n"),
        "seed": r.get("seed"),
        "batch_size": r.get("batch_size"),
        "norm": tm.get("norm"),
        "version": r.get("robustlab_version"),
        "engine": (r.get("engine") or {}).get("engine"),
        "world_size": r.get("world_size", 1),
        "hpm": model.get("hpm"),
        "attacked_through": model.get("attacked_through"),
        "attack": _without_eps(r.get("attack") or {}, float(tm["eps"])),
    }
    return json.dumps(key, sort_keys=True, default=str)


def _option_rows(config: dict[str, Any], seed: Any) -> Rows:
    """A single attack's options as rows, the step size as a multiple of eps; the seed only
    where it differs from the evaluation's."""
    rows: Rows = []
    for key, value in sorted(config.items()):
        if key in ("name", "norm", "eps") or (key == "seed" and value == seed):
            continue
        name = OPTION_NAMES.get(key, key.replace("_", " "))
        if isinstance(value, dict) and "times_eps" in value:
            rows.append((name, f"{value['times_eps']:g} x eps"))
        else:
            rows.append((name, value_text(value)))
    return rows


def _ensemble_rows(config: dict[str, Any], seed: Any) -> Rows:
    """One row per member of an AutoAttack configuration, in the order they run."""
    components = config.get("components") or {}
    rows: Rows = [("version", str(config.get("version", "standard")))]
    for member in members(config):
        options = _option_rows(components.get(member) or {}, seed)
        rows.append((member, "; ".join(f"{k} {v}" for k, v in options) or "defaults"))
    return rows


def _attack_config(config: dict[str, Any], seed: Any) -> tuple[tuple[str, str], Rows]:
    """The attack configuration table: (option, value) rows of a single attack; (member,
    settings) rows of an ensemble (AutoAttack; MSA's plain stage and surrogate attacks)."""
    name = config.get("name")
    if name == "msa":
        rows = _ensemble_rows(config.get("autoattack") or {}, seed)
        rows.append(("surrogates", value_text(config.get("surrogates") or [])))
        on_each = value_text(config.get("surrogate_attacks") or [])
        rows.append(("on each surrogate", f"{on_each} (settings as above)"))
        return ("member", "settings"), rows
    if name == "autoattack":
        return ("member", "settings"), _ensemble_rows(config, seed)
    return ("option", "value"), _option_rows(config, seed)


def _dates(records: Sequence[dict[str, Any]]) -> str:
    """The dates of some records: one, or first – last."""
    days = sorted({str(r.get("created", ""))[:19].replace("T", " ") for r in records} - {""})
    if not days:
        return "not recorded"
    return days[0] if len(days) == 1 else f"{days[0]} – {days[-1]}"


def _protocol(pid: str, records: list[dict[str, Any]], rows: list[str]) -> Protocol:
    """The shared protocol of some evaluation records (one robustness curve, or repeats)."""
    first = records[0]
    config = _without_eps(first.get("attack") or {}, float(first["threat_model"]["eps"]))
    seed = first.get("seed")
    engine = first.get("engine") or {}
    model = first.get("model") or {}
    eps_all = ", ".join(
        eps_text(e) for e in sorted({float(r["threat_model"]["eps"]) for r in records})
    )
    how = "MSA protocol" if first.get("kind") == "msa" else "plain (the model's own forward)"
    settings: Rows = [
        ("evaluation", how),
        ("attack", attack_title(first.get("attack") or {})),
        ("threat model", f"{first['threat_model'].get('norm')}, eps {eps_all}"),
        ("data", str(first.get("data", "–"))),
        ("points", f"the first {first.get('n')} test points"),
        ("seed", value_text(seed)),
        ("evaluation batch", value_text(first.get("batch_size"))),
        ("robustlab version", str(first.get("robustlab_version", "not recorded"))),
        ("date", _dates(records)),
        (
            "engine (passes without gradient)",
            f"{engine.get('engine')}: {engine.get('reason')}" if engine else "not recorded",
        ),
    ]
    if int(first.get("world_size") or 1) > 1:
        settings.append(("processes (torchrun)", str(first["world_size"])))
    if model.get("hpm"):
        settings.append(("HPM head", value_text(model["hpm"])))
    if model.get("attacked_through"):
        settings.append(("attacked through", str(model["attacked_through"])))
    if model.get("trusted_unhashed"):
        settings.append(("weights", "loaded without a hash (--trust-unhashed)"))
    elapsed = sum(float(r.get("elapsed_s") or 0.0) for r in records)
    settings.append(("attack time", f"{elapsed:.3g} s in all"))
    resumed = sum(int(r.get("resumed_batches") or 0) for r in records)
    if resumed:
        settings.append(("resumed batches", str(resumed)))
    envs = {value_text(r["environment"]) for r in records if isinstance(r.get("environment"), dict)}
    settings += [("environment", env) for env in sorted(envs)]
    header, attack_rows = _attack_config(config, seed)
    commands = list(dict.fromkeys(str(r["command"]) for r in records if r.get("command")))
    title = attack_title(first.get("attack") or {})
    return Protocol(pid, title, rows, settings, header, attack_rows, commands)


def _row(r: dict[str, Any], rid: str, pid: str) -> RobustRow:
    """The robust-accuracy row of one eval or msa record."""
    config = r.get("attack") or {}
    how, full = grade(config)
    n = int(r.get("n") or 0)
    robust = float(r.get("robust_accuracy", 0.0))
    plain = r.get("plain_robust_accuracy")
    return RobustRow(
        id=rid,
        protocol=pid,
        kind=str(r.get("kind")),
        data=str(r.get("data", "–")),
        norm=str(r["threat_model"].get("norm")),
        eps=float(r["threat_model"]["eps"]),
        attack=attack_title(config),
        grade=how,
        autoattack_grade=full,
        gradient_free=gradient_free(config),
        n=n,
        clean_accuracy=float(r.get("clean_accuracy", 0.0)),
        robust_accuracy=robust,
        interval=wilson(robust, n),
        created=str(r.get("created", "")),
        label=r.get("label"),
        plain_robust_accuracy=float(plain) if isinstance(plain, (int, float)) else None,
        stages=_stages(r.get("stages"), "stage"),
        members=_stages(r.get("per_attack"), "attack"),
        warnings=[str(w) for w in r.get("warnings") or []],
        command=str(r["command"]) if r.get("command") else None,
    )


def robust_rows(evals: list[dict[str, Any]]) -> tuple[list[RobustRow], list[Protocol]]:
    """One row per eval / msa record (by norm, then eps, then date: R1, R2, ...) and the
    protocols they ran under (P1, ... in order of first use)."""
    ordered = sorted(
        evals,
        key=lambda r: (
            str(r["threat_model"].get("norm")),
            float(r["threat_model"]["eps"]),
            str(r.get("created", "")),
        ),
    )
    ids: dict[str, str] = {}
    grouped: dict[str, list[int]] = {}
    rows = []
    for k, r in enumerate(ordered):
        pid = ids.setdefault(_protocol_key(r), f"P{len(ids) + 1}")
        grouped.setdefault(pid, []).append(k)
        rows.append(_row(r, f"R{k + 1}", pid))
    protocols = [
        _protocol(pid, [ordered[k] for k in ks], [rows[k].id for k in ks])
        for pid, ks in grouped.items()
    ]
    return rows, protocols


def summary(rows: list[RobustRow]) -> list[SummaryRow]:
    """Per data and threat model, the lowest robust accuracy stored (the strongest attack
    found), an AutoAttack-grade row preferred among equals."""
    best: dict[tuple[str, str, float], RobustRow] = {}
    for row in rows:
        have = best.get((row.data, row.norm, row.eps))
        rank = (row.robust_accuracy, not row.autoattack_grade)
        if have is None or rank < (have.robust_accuracy, not have.autoattack_grade):
            best[(row.data, row.norm, row.eps)] = row
    return [
        SummaryRow(
            r.data,
            r.norm,
            r.eps,
            r.clean_accuracy,
            r.robust_accuracy,
            r.id,
            r.attack,
            r.autoattack_grade,
            r.n,
        )  # fmt: skip
        for r in sorted(best.values(), key=lambda r: (r.data, r.norm, r.eps))
    ]


def clean_rows(rows: list[RobustRow], manifest: dict[str, Any]) -> list[CleanRow]:
    """Clean accuracy per data and number of points, as the evaluations measured it, and as
    the manifest states it (measured when the checkpoint was written)."""
    seen: dict[tuple[str, int, float], list[str]] = {}
    for row in rows:
        seen.setdefault((row.data, row.n, row.clean_accuracy), []).append(row.id)
    out = [CleanRow(d, n, acc, f"evaluations {span(ids)}") for (d, n, acc), ids in seen.items()]
    metrics = manifest.get("metrics") or {}
    if isinstance(metrics.get("clean_accuracy"), (int, float)):
        data = str((manifest.get("dataset") or {}).get("name", "–")) + "/test"
        n = int(metrics.get("test_samples") or 0)
        out.append(CleanRow(data, n, float(metrics["clean_accuracy"]), "the manifest"))
    return out
