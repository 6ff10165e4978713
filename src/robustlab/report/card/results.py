"""The other stored results on a model card, one flat row each: transfer attacks with the
model as source or target, DeepSloth slowdown attacks, compressibility measurements and
universal perturbations."""

from __future__ import annotations

from typing import Any


def transfer_rows(matched: list[tuple[dict[str, Any], list[str]]]) -> list[dict[str, Any]]:
    """The transfer cells with this model (under any of the ``names`` its record gives it)
    as source (alone or in an ensemble A+B) or as target, T1, T2, ..."""
    out: list[dict[str, Any]] = []
    for record, names in matched:
        tm = record.get("threat_model") or {}
        for cell in record.get("cells") or []:
            if not isinstance(cell, dict):
                continue
            for name in names:
                if cell.get("target") == name:
                    role, other = "target", str(cell.get("source"))
                elif name in str(cell.get("source", "")).split("+"):
                    role, other = "source", str(cell.get("target"))
                else:
                    continue
                out.append(
                    {
                        "id": f"T{len(out) + 1}",
                        "role": role,
                        "other": other,
                        "attack": str(cell.get("attack")),
                        "gamma": cell.get("gamma"),
                        "white_box": bool(cell.get("white_box")),
                        "success_rate": float(cell.get("success_rate", 0.0)),
                        "n": int(cell.get("n") or 0),
                        "n_all": int(record.get("n") or cell.get("n_all") or 0),
                        "adversarial_accuracy": float(cell.get("target_adversarial_accuracy", 0.0)),
                        "targeted": bool(record.get("targeted")),
                        "norm": str(tm.get("norm")),
                        "eps": float(tm.get("eps", 0.0)),
                        "data": str(record.get("data", "–")),
                        "created": str(record.get("created", "")),
                    }
                )
    return out


def sloth_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DeepSloth results: efficacy, FLOPs saved and final-exit accuracy, clean vs attacked,
    for the attack and each extra run the record holds (baselines, universal, black-box)."""
    out: list[dict[str, Any]] = []
    for r in records:
        clean = r.get("clean") or {}
        tm = r.get("threat_model") or {}
        runs = [(str(r.get("variant")), r.get("attacked") or {})]
        runs += [(str(name), r.get(name) or {}) for name in r.get("extras") or []]
        for variant, res in runs:
            out.append(
                {
                    "variant": variant,
                    "norm": str(tm.get("norm")),
                    "eps": float(tm.get("eps", 0.0)),
                    "n": int(r.get("n") or 0),
                    "efficacy_clean": clean.get("efficacy"),
                    "efficacy_attacked": res.get("efficacy"),
                    "flops_saving_clean": clean.get("flops_saving"),
                    "flops_saving_attacked": res.get("flops_saving"),
                    "accuracy_final_attacked": res.get("accuracy_final"),
                    "created": str(r.get("created", "")),
                }
            )
    return out


def compress_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compressibility results: per norm, the loss-rise bound against the measured gap."""
    out = []
    for r in records:
        net = r.get("network") or {}
        for norm, gap in (r.get("gap") or {}).items():
            bound = (r.get("bound") or {}).get(norm) or {}
            out.append(
                {
                    "norm": str(norm),
                    "eps": gap.get("eps"),
                    "n": r.get("n"),
                    "bound": bound.get("bound"),
                    "refused": bound.get("refused"),
                    "gap_max": gap.get("max"),
                    "gap_mean": gap.get("mean"),
                    "holds": (r.get("bound_holds") or {}).get(norm),
                    "robust_accuracy": gap.get("robust_accuracy"),
                    "attack": f"{gap.get('attack')}-{gap.get('steps')}",
                    "stable_rank": net.get("stable_rank"),
                    "created": str(r.get("created", "")),
                }
            )
    return out


def uap_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Universal perturbations: fooling rate against random noise of the same norm."""
    return [
        {
            "method": str((r.get("attack") or {}).get("method", "?")),
            "per_class": bool(r.get("per_class")),
            "norm": str((r.get("threat_model") or {}).get("norm")),
            "eps": float((r.get("threat_model") or {}).get("eps", 0.0)),
            "n": r.get("n_eval"),
            "fooling_rate": r.get("fooling_rate"),
            "random_fooling_rate": r.get("random_fooling_rate"),
            "clean_accuracy": r.get("clean_accuracy"),
            "perturbed_accuracy": r.get("perturbed_accuracy"),
            "created": str(r.get("created", "")),
        }
        for r in records
    ]
