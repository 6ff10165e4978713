"""How much detectors are worth: detection AUROC, the true-positive rate at the fitted 5 %
false-positive threshold, and the robust accuracy of classifier + detector, against attacks
that ignore the detector and against an adaptive attack on both.

Definitions (per detector, per attack, on the first n test points):

- a *successful* adversarial example is one of a point the model classifies correctly clean
  and misclassifies under attack; AUROC compares the detector's scores of the correctly
  classified clean points with those of the successful examples, and the TPR is the share of
  successful examples flagged at the threshold fitted on clean held-out data;
- an input is *defended* when it is classified correctly or flagged; the system's robust
  accuracy is the share of the n attacked points that are defended.

The adaptive attack (Carlini & Wagner 2017; Tramer et al. 2020) attacks classifier and
detector together: the model is extended with a (K+1)-th "adversarial" logit
``max_j z_j + (s(x) - t) / sigma`` (s the detector's score, t its threshold, sigma the spread
of its clean held-out scores), which is the largest exactly when the input is flagged, and the
registry's PGD attacks that extended classifier *targeted*, with its CW margin loss
``z_c - max_{i != c} z_i`` over all K+1 logits: an example classified as the target class c
is misclassified (c != y) and not flagged (else the (K+1)-th logit would be the largest), so
PGD's own success test and per-sample best-keeping serve the joint goal unchanged. The target
is the class the non-adaptive attack's example was given where it was misclassified (that
class is reachable), else the clean input's most likely wrong class. Per sample the stronger
of its example and the non-adaptive attack's is kept (the system counts as broken if either
breaks it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attacks.base import Attack
from ..core.guard import evaluating
from ..errors import RobustlabError
from .detectors import Detector
from .detectors_suite import DetectorSuite, scores_of


def auroc(negative: torch.Tensor, positive: torch.Tensor) -> float | None:
    """P(positive score > negative score) + P(equal) / 2; None when either set is empty."""
    if len(negative) == 0 or len(positive) == 0:
        return None
    neg, pos = negative.double()[:, None], positive.double()[None, :]
    return float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())


def defended(pred: torch.Tensor, y: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
    """Per input: classified correctly or flagged."""
    return (pred == y) | flagged


def detection_metrics(
    clean_scores: torch.Tensor,
    clean_pred: torch.Tensor,
    adv_scores: torch.Tensor,
    adv_pred: torch.Tensor,
    y: torch.Tensor,
    threshold: float,
) -> dict[str, Any]:
    """AUROC, TPR at the threshold, and robust accuracy with and without the detector."""
    ok = clean_pred == y
    success = ok & (adv_pred != y)
    flagged = adv_scores > threshold
    tpr = float(flagged[success].double().mean()) if bool(success.any()) else None
    return {
        "auroc": auroc(clean_scores[ok], adv_scores[success]),
        "tpr_at_threshold": tpr,
        "successful": int(success.sum()),
        "flagged_successful": int((flagged & success).sum()),
        "robust_accuracy": float(((adv_pred == y) & ok).double().mean()),
        "system_robust_accuracy": float(defended(adv_pred, y, flagged).double().mean()),
    }


class WithDetector(nn.Module):
    """A classifier extended with a (K+1)-th logit that is the largest exactly when the
    detector flags the input: ``max_j z_j + (s(x) - threshold) / scale``."""

    def __init__(self, model: nn.Module, detector: Detector, threshold: float, scale: float):
        super().__init__()
        self.model, self.detector = model, detector
        self.threshold, self.scale = threshold, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits and the detector's."""
        s, z = self.detector.score_and_logits(self.model, x)
        extra = z.amax(dim=1) + (s - self.threshold) / self.scale
        return torch.cat([z, extra[:, None]], dim=1)


@dataclass(frozen=True)
class AttackSpec:
    """One attack to evaluate against: its name in records, the attack, and the model it is
    crafted on (None: the defended model itself; else a transfer source)."""

    name: str
    attack: Attack
    source: nn.Module | None = None


def _craft(
    attack: Attack,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attack's examples of ``(x, y)`` on ``model`` (targeted when ``targets`` are
    given), batch by batch (detached)."""
    out = []
    for i in range(0, len(x), batch):
        t = None if targets is None else targets[i : i + batch]
        out.append(attack(model, x[i : i + batch], y[i : i + batch], t).detach())
    return torch.cat(out)


def _predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The model's predictions, batched, without gradients."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def adaptive_attack(norm: str, eps: float, steps: int, seed: int, restarts: int = 1) -> Attack:
    """The registry's PGD with the CW margin loss, run targeted on the extended classifier."""
    from ..attacks.registry import make_attack

    return make_attack("pgd", norm, eps, steps=steps, loss="cw", restarts=restarts, seed=seed)


def adaptive_targets(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, fallback_pred: torch.Tensor | None
) -> torch.Tensor:
    """Per point, the adaptive attack's target: the non-adaptive example's class where it was
    misclassified, else the clean input's most likely wrong class."""
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)])
    runner_up = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
    if fallback_pred is None:
        return runner_up
    return torch.where(fallback_pred != y, fallback_pred, runner_up)


def evaluate_detectors(
    model: nn.Module,
    suite: DetectorSuite,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[AttackSpec],
    *,
    adaptive: Attack | None = None,
    batch_size: int = 100,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Every detector of ``suite`` against every attack and the adaptive one (see the module).

    The adaptive attack's per-sample fallback is the first attack crafted on ``model`` itself.
    """
    if not attacks:
        raise RobustlabError("name at least one attack to evaluate the detectors against")
    suite.check_model(model)
    suite.check_inputs(x)
    results: list[dict[str, Any]] = []
    attack_rows: list[dict[str, Any]] = []
    with evaluating(model):
        clean_pred = _predict(model, x)
        clean = suite.score(model, x)
        clean_fpr = {
            n: float((s[clean_pred == y] > suite.thresholds[n]).double().mean())
            for n, s in clean.items()
        }
        fallback: tuple[str, torch.Tensor, torch.Tensor] | None = None
        survived: dict[str, torch.Tensor] = {}  # per detector: defended under every attack
        for spec in attacks:
            t0 = time.perf_counter()
            crafted_on = spec.source if spec.source is not None else model
            x_adv = _craft(spec.attack, crafted_on, x, y, batch_size)
            if not bool(spec.attack.threat.contains(x, x_adv).all()):
                raise RuntimeError(f"attack {spec.name} left its threat model: a bug")
            pred = _predict(model, x_adv)
            scores = suite.score(model, x_adv)
            seconds = time.perf_counter() - t0
            if fallback is None and spec.source is None:
                fallback = (spec.name, x_adv, pred)
            attack_rows.append(
                {
                    "name": spec.name,
                    "config": spec.attack.config(),
                    "transfer": spec.source is not None,
                    "robust_accuracy": float(((pred == y) & (clean_pred == y)).double().mean()),
                    "seconds": round(seconds, 2),
                }
            )
            for name in suite.detectors:
                m = detection_metrics(
                    clean[name], clean_pred, scores[name], pred, y, suite.thresholds[name]
                )
                held = defended(pred, y, scores[name] > suite.thresholds[name])
                survived[name] = survived.get(name, held) & held
                results.append({"detector": name, "attack": spec.name, "adaptive": False, **m})
            say(f"  {spec.name}: robust accuracy {100 * attack_rows[-1]['robust_accuracy']:.1f} %")
        adaptive_rows = []
        if adaptive is not None:
            for name, det in suite.detectors.items():
                t0 = time.perf_counter()
                joint = WithDetector(model, det, suite.thresholds[name], suite.scales[name]).eval()
                base_pred = None if fallback is None else fallback[2]
                targets = adaptive_targets(model, x, y, base_pred)
                x_adv = _craft(adaptive, joint, x, y, batch_size, targets)
                if not bool(adaptive.threat.contains(x, x_adv).all()):
                    raise RuntimeError("the adaptive attack left its threat model: a bug")
                pred = _predict(model, x_adv)
                s = scores_of(det, model, x_adv)
                if fallback is not None:  # per sample, the stronger of the two examples
                    _, x_base, pred_base = fallback
                    s_base = scores_of(det, model, x_base)
                    thr = suite.thresholds[name]
                    broke = ~defended(pred, y, s > thr)
                    take_base = ~broke & ~defended(pred_base, y, s_base > thr)
                    pred = torch.where(take_base, pred_base, pred)
                    s = torch.where(take_base, s_base, s)
                    kept_base = int(take_base.sum())
                else:
                    kept_base = 0
                m = detection_metrics(clean[name], clean_pred, s, pred, y, suite.thresholds[name])
                survived[name] = survived[name] & defended(pred, y, s > suite.thresholds[name])
                results.append(
                    {
                        "detector": name,
                        "attack": "adaptive",
                        "adaptive": True,
                        **m,
                        "fallback_examples_kept": kept_base,
                    }
                )
                adaptive_rows.append(
                    {
                        "detector": name,
                        "gradient": det.gradient,
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                )
                say(
                    f"  adaptive vs {name}: system robust accuracy "
                    f"{100 * m['system_robust_accuracy']:.1f} %"
                )
    record: dict[str, Any] = {
        "n": len(x),
        "clean_accuracy": float((clean_pred == y).double().mean()),
        "detectors": {
            n: {
                "threshold": suite.thresholds[n],
                "fpr_clean_test": clean_fpr[n],
                "fpr_target": suite.info.get("fit", {}).get("fpr_target"),
            }
            for n in suite.detectors
        },
        "attacks": attack_rows,
        "results": results,
        "side_by_side": side_by_side(results),
    }
    for name, held in survived.items():  # per sample, the worst case over every attack
        record["side_by_side"][name]["system_robust_accuracy_all_attacks"] = float(
            held.double().mean()
        )
    if adaptive is not None:
        record["adaptive"] = {
            "attack": adaptive.config(),
            "objective": (
                "targeted CW margin z_c - max_{i != c} z_i over the classifier extended with "
                "the detector as a (K+1)-th 'adversarial' logit z_{K+1} = max_j z_j + "
                "(s(x) - threshold) / clean_score_std; target c: the non-adaptive example's "
                "class where it was misclassified, else the clean input's most likely wrong class"
            ),
            "keeps": (
                "per sample PGD's first example classified as the target (misclassified and "
                "not flagged), else its highest-loss one, unless the non-adaptive "
                f"'{fallback[0] if fallback else '-'}' example breaks the system and it does not"
            ),
            "per_detector": adaptive_rows,
        }
    return record


def side_by_side(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per detector: the non-adaptive attack that leaves the system the lowest robust accuracy,
    and the adaptive attack, with their AUROC, TPR and system robust accuracy (the evaluation
    adds the per-sample worst case over all of them, ``system_robust_accuracy_all_attacks``)."""
    out: dict[str, dict[str, Any]] = {}
    keys = ("auroc", "tpr_at_threshold", "system_robust_accuracy")
    for r in results:
        entry = out.setdefault(r["detector"], {})
        slot = "adaptive" if r["adaptive"] else "non_adaptive"
        best = entry.get(slot)
        if best is None or r["system_robust_accuracy"] < best["system_robust_accuracy"]:
            entry[slot] = {"attack": r["attack"], **{k: r[k] for k in keys}}
    return out
