"""The end of a model card: its known limits (what was not evaluated, and what the numbers
therefore do not say) and its reproducibility block (versions, the commands behind the
results)."""

from __future__ import annotations

from typing import Any

from .evals import RobustRow
from .records import Matched
from .text import Rows, eps_text, span

#: Below this many points an evaluation's sampling error is named (RobustBench uses 10,000 on
#: CIFAR-10, mnist5k has 1,000 test points).
FEW_POINTS = 1000


def _robustness_limits(rows: list[RobustRow], manifest: dict[str, Any], suggest: str) -> list[str]:
    """What the stored robust accuracies do not say: attack strength, threat models,
    sampling error, data, randomness."""
    if not rows:
        return [
            "No robust accuracy of this model is stored, so nothing here says how robust it "
            f"is. Produce one with `{suggest}`."
        ]
    out = []
    weak = [r for r in rows if not r.autoattack_grade]
    if len(weak) == len(rows):
        names = ", ".join(sorted({r.attack for r in rows}))
        out.append(
            f"No AutoAttack-grade evaluation is stored: every robust accuracy here comes from "
            f"{names}. Each is a lower bound on attack success, i.e. an upper bound on robust "
            f"accuracy: a stronger attack may find more. For the number the field reports: "
            f"`{suggest}`."
        )
    elif weak:
        graded = {(r.norm, r.eps) for r in rows if r.autoattack_grade}
        loose = sorted({(r.norm, r.eps) for r in weak} - graded)
        if loose:
            where = "; ".join(
                f"{norm} eps " + ", ".join(eps_text(e) for n, e in loose if n == norm)
                for norm in dict.fromkeys(n for n, _ in loose)
            )
            out.append(
                f"At {where} only weaker attacks were run: those robust accuracies are upper "
                "bounds (lower bounds on attack success), not AutoAttack-grade numbers."
            )
    norms = {r.norm for r in rows}
    missing = [n for n in ("linf", "l2", "l1") if n not in norms]
    if missing:
        out.append(
            f"Evaluated under {', '.join(sorted(norms))} only: nothing is known of its "
            f"robustness under {', '.join(missing)}."
        )
    few = [r for r in rows if r.n < FEW_POINTS]
    if few:
        widest = max(few, key=lambda r: r.interval[1] - r.interval[0])
        half = 100 * (widest.interval[1] - widest.interval[0]) / 2
        test_size = (manifest.get("dataset") or {}).get("test_size")
        sizes = ", ".join(str(n) for n in sorted({r.n for r in few}))
        if {r.n for r in few} == {test_size}:
            what = f"The test set has only {test_size} points"
        else:
            of = f" of {test_size}" if isinstance(test_size, int) else ""
            what = f"Some evaluations ran on few points ({sizes}{of})"
        out.append(
            f"{what}: 95 % intervals reach +/- {half:.1f} points ({widest.id}); a difference "
            "smaller than that between two models may be chance; compare on the same points."
        )
    trained_on = (manifest.get("dataset") or {}).get("name")
    other = sorted({r.data.split("/")[0] for r in rows} - {str(trained_on)})
    if trained_on and other:
        out.append(
            f"Some evaluations ran on {', '.join(other)}, not on {trained_on}, the data the "
            "model was trained on."
        )
    random = any("non-deterministic" in w for r in rows for w in r.warnings)
    if random and not any("rand" in r.grade for r in rows):
        out.append(
            "The model's outputs are random, and no evaluation for randomised defences "
            "(AutoAttack rand, with EOT) is stored: its robust accuracy is overstated."
        )
    return out


def known_limits(
    rows: list[RobustRow], manifest: dict[str, Any], matched: Matched, suggest: str
) -> list[str]:
    """What was not evaluated, and what the stored numbers therefore do not say."""
    out = _robustness_limits(rows, manifest, suggest)
    if not matched.transfers:
        out.append("No transfer (black-box) attack to or from this model is stored.")
    if isinstance((manifest.get("model") or {}).get("multi_exit"), dict) and not matched.sloths:
        out.append("A multi-exit model, but no slowdown (DeepSloth) attack on it is stored.")
    if not matched.compresses:
        out.append("No compressibility measurement is stored.")
    if manifest.get("format") == "legacy-pt":
        out.append(
            "A legacy weights file without a manifest: how it was trained, and on what, is "
            "not known to robustlab."
        )
    elif manifest.get("format") != "robustlab-checkpoint":
        out.append(
            "A foreign model: its manifest says what was loaded, not how it was trained, so "
            "its recipe is not known to robustlab."
        )
    if (manifest.get("weights") or {}).get("trusted_unhashed"):
        out.append("Its checkpoint has no weights hash: no stored record can be tied to it.")
    return out


def versions(matched: Matched, manifest: dict[str, Any]) -> Rows:
    """The versions behind the results: robustlab per record kind, Python / torch / numpy /
    platform where the records carry them."""
    rows: Rows = []
    if manifest.get("robustlab_version"):
        rows.append(("checkpoint written by", f"robustlab {manifest['robustlab_version']}"))
    made: dict[str, set[str]] = {}
    env: dict[str, set[str]] = {}
    for r in matched.all():
        version = r.get("robustlab_version")
        made.setdefault(str(r.get("kind")), set()).add(
            f"robustlab {version}" if version else "not recorded"
        )
        for key, value in (r.get("environment") or {}).items():
            env.setdefault(str(key), set()).add(str(value))
    rows += [(f"{kind} records made by", ", ".join(sorted(v))) for kind, v in sorted(made.items())]
    rows += [(key, ", ".join(sorted(v))) for key, v in sorted(env.items())]
    quant = manifest.get("quantization")
    if isinstance(quant, dict) and quant.get("torch_version"):
        rows.append(("torch of the int8 conversion", str(quant["torch_version"])))
    return rows


def commands(matched: Matched, rows: list[RobustRow]) -> tuple[list[tuple[str, str]], int]:
    """The command lines the records carry, each with what it produced (rows R1, ... or the
    record's kind), and how many records carry none (a stored train manifest never does)."""
    found: dict[str, list[str]] = {}
    missing = 0
    for row in rows:
        if row.command:
            found.setdefault(row.command, []).append(row.id)
        else:
            missing += 1
    for r in matched.all():
        if r.get("kind") in ("eval", "msa", "train"):
            continue
        if r.get("command"):
            found.setdefault(str(r["command"]), []).append(str(r.get("kind")))
        else:
            missing += 1
    return [(cmd, span(list(dict.fromkeys(what)))) for cmd, what in found.items()], missing
