"""One table of checks that every registered attack runs through (Foolbox style).

Per attack and norm: examples inside the threat model, the caller's model exactly as it was
(mode, parameters, requires_grad, hooks, gradients; also when the forward pass raises), eps 0
returns the inputs, the seed alone decides the result, a JSON-able config, and clear errors
for bad inputs and bad configurations. Then the attack must *work*: on a trained net at a
budget where it must succeed, its goal is reached on most points (accuracy falls, or for a
slowdown attack the saved computation falls), and given targets it reaches them (or refuses
targets with a clear error). The per-attack test files only test what is specific.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from robustlab.analysis.efficiency import measure_efficiency
from robustlab.attacks import REGISTRY, Attack, ThreatModel, make_attack
from robustlab.attacks.registry import KINDS
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.multiexit import MultiExitNetwork, attach_exits

# small budgets keep the table fast; the published defaults are checked per attack elsewhere
FAST: dict[str, dict[str, object]] = {
    "pgd": {"steps": 5},
    "fgsm": {},
    "bim": {"steps": 5},
    "mifgsm": {"steps": 5},
    "difgsm": {"steps": 5},
    "tifgsm": {"steps": 5},
    "cw": {"steps": 10, "binary_steps": 2},
    "apgd-ce": {"steps": 10},
    "apgd-dlr": {"steps": 10},
    "apgd-t": {"steps": 10, "n_target_classes": 2},
    "fab": {"steps": 10},
    "fab-t": {"steps": 10, "n_target_classes": 2},
    "square": {"queries": 50},
    "deepfool": {"steps": 10},
    "autoattack": {"attacks": ("apgd-ce", "apgd-t"), "version": "custom"},
    "iterative": {"steps": 5},
    "deepsloth": {"steps": 5},
    "pgd-final": {"steps": 5},
    "pgd-avg": {"steps": 5},
    "pgd-max": {"steps": 5},
}
NORMS = {"cw": ["l2"], "deepfool": ["linf", "l2"]}
# The model each kind of registered attack runs on (the per-name hook: an attack's kind in
# the registry): "net" a conv net, "multi-exit" the same with exits (see _model, _model_for).
MODEL_FOR_KIND = {"classifier": "net", "surrogate": "net", "multi-exit": "multi-exit"}
# Kinds the table cannot run, each with the reason and where it is tested instead.
ELSEWHERE = {
    "transfer": "built by analysis.transfer.parse_attack from a base name above plus gradient "
    "transforms (not by make_attack); tests/analysis/test_transfer_matrix.py runs it",
}
NAMES = [name for name, entry in REGISTRY.items() if entry.kind in MODEL_FOR_KIND]
CASES = [(name, norm) for name in NAMES for norm in NORMS.get(name, ["linf", "l2", "l1"])]


EPS = {"linf": 0.1, "l2": 0.5, "l1": 2.0}
ZERO_EPS_REFUSED = {"fgsm", "bim", "mifgsm", "difgsm", "tifgsm"}  # their step size is from eps


def _model(name: str = "") -> nn.Module:
    """A small untrained conv net with batch norm (train-mode state that must survive the
    attack) on 1x6x6 inputs with 5 classes; for an attack of the multi-exit kind, a width-4
    resnet8 with exits after units 0 and 1."""
    torch.manual_seed(0)
    if name and MODEL_FOR_KIND[REGISTRY[name].kind] == "multi-exit":
        return attach_exits(build_model("resnet8", 1, 5, 6, width=4), (1, 6, 6), 5, [0, 1])
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 5),
    )


def _first_conv(model: nn.Module) -> nn.Conv2d:
    """The first convolution, which every forward pass of the table's models runs once."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _fail_on_call(model: nn.Module, fail_at: int) -> list[int]:
    """Make the model's ``fail_at``-th forward pass (1-based) raise; returns the call count."""
    calls = [0]

    def count(module: nn.Module, inputs: object) -> None:
        """Count a forward pass; raise on the ``fail_at``-th."""
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("boom")

    _first_conv(model).register_forward_pre_hook(count)
    return calls


def _snapshot(model: nn.Module) -> tuple[object, ...]:
    """Everything an attack must leave as it was: modes, state, requires_grad, hooks, grads."""
    return (
        [m.training for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        [p.grad is None for p in model.parameters()],
    )


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """Two snapshots agree (tensors compared exactly)."""
    sa, sb = a[1], b[1]
    assert isinstance(sa, dict) and isinstance(sb, dict)
    tensors = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return tensors and a[0] == b[0] and a[2:] == b[2:]


def test_the_table_covers_every_registered_attack() -> None:
    assert set(KINDS) == set(MODEL_FOR_KIND) | set(ELSEWHERE), "a new kind: run it or say why"
    assert set(FAST) == set(NAMES), f"FAST rows differ from the registry's names {NAMES}"


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_every_attack_passes_the_same_checks(name: str, norm: str) -> None:
    eps = EPS[norm]
    attack = make_attack(name, norm, eps, seed=1, **FAST[name])
    model = _model(name)
    model.train()
    _first_conv(model).weight.requires_grad_(False)
    before = _snapshot(model)
    x, y = torch.rand(12, 1, 6, 6), torch.randint(0, 5, (12,))
    with pytest.warns(UserWarning, match="train mode"):
        a = attack(model, x, y)
    # inside the threat model, same shape and dtype
    assert a.shape == x.shape and a.dtype == x.dtype
    assert bool(ThreatModel(norm, eps).contains(x, a).all())
    # the caller's model exactly as it was
    assert _same(_snapshot(model), before)
    # the seed alone gives the examples: the global generator plays no part
    model.eval()
    torch.manual_seed(123)
    first = attack(model, x, y)
    torch.manual_seed(456)
    assert torch.equal(attack(model, x, y), first)
    # eps 0: the inputs are the only admissible points (or a clear refusal, as FGSM's
    # step size eps must be > 0)
    try:
        zero = make_attack(name, norm, 0.0, seed=1, **FAST[name])
    except RobustlabError:
        assert name in ZERO_EPS_REFUSED
    else:
        assert torch.equal(zero(model, x, y), x)
    # the config is JSON-able and names the attack
    cfg = attack.config()
    assert cfg["eps"] == eps and isinstance(cfg["name"], str)
    json.dumps(cfg)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_every_attack_restores_the_model_when_the_forward_pass_raises(name: str, norm: str) -> None:
    fail_at = 1 if name == "fgsm" else 2  # FGSM makes one pass; others raise mid-attack
    model = _model(name)
    _first_conv(model).weight.requires_grad_(False)
    x = torch.rand(6, 1, 6, 6)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)  # correctly classified: every attack has work
    model.train()
    calls = _fail_on_call(model, fail_at)
    before = _snapshot(model)
    attack = make_attack(name, norm, EPS[norm] / 10, seed=1, **FAST[name])
    with pytest.raises(RuntimeError, match="boom"), pytest.warns(UserWarning, match="train mode"):
        attack(model, x, y)
    assert calls[0] == fail_at
    assert _same(_snapshot(model), before)


@pytest.mark.parametrize("name", NAMES)
def test_every_attack_refuses_bad_inputs(name: str) -> None:
    norm = "l2" if name == "cw" else "linf"
    attack = make_attack(name, norm, 0.1, **FAST[name])
    model = _model(name).eval()
    x, y = torch.rand(4, 1, 6, 6), torch.randint(0, 5, (4,))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(RobustlabError, match="NaN"):
        attack(model, bad, y)
    with pytest.raises(RobustlabError, match=r"\[0,1\]"):
        attack(model, x * 3, y)
    with pytest.raises(RobustlabError, match="disagree"):
        attack(model, x, y[:3])
    with pytest.raises(RobustlabError, match="eps must be a finite number >= 0"):
        make_attack(name, norm, -1.0)
    with pytest.raises(RobustlabError, match="norm"):
        make_attack(name, "l3", 0.1)


# -- the attacks work: goals reached on a trained model ---------------------------------------

# Budgets at which every attack must break most points of the trained digits net (8x8 inputs).
STRONG_EPS = {"linf": 0.3, "l2": 3.0, "l1": 20.0}


@dataclass(frozen=True)
class Strong:
    """How the success table runs one attack name.

    ``options``: make_attack options (fewer steps/queries than published only where the
    attack still must succeed); the model is the trained one MODEL_FOR_KIND names for the
    attack's kind (the conv net, or it with trained exits). ``goal``: a key of GOALS, the score the attack must push down. ``bound``: per norm, the
    adversarial score must be <= bound x the clean score (default 0.5). ``hit``: per norm,
    the least fraction of points classified as their target when targets are given (default
    0.5; below 0.5 the target's margin must also rise on >= 90 % of points); ``hit=None``:
    the attack refuses targets with a RobustlabError (it never ignores them silently).
    """

    options: dict[str, object] = field(default_factory=dict)
    goal: str = "misclassify"
    bound: dict[str, float] = field(default_factory=dict)
    hit: dict[str, float] | None = field(default_factory=dict)


# Measured on 100 test digits (clean accuracy 0.94), seed 1: every default-bound case ends
# at robust accuracy <= 0.03 (ratio <= 0.03) and target hit rate >= 0.64 (CW; difgsm linf
# 0.65, FAB 0.73 - 0.88, the rest >= 0.76), except the rows commented below. The iterative
# family's l1 step moves the top 1 % of coordinates, one pixel of 64, per step: on 8x8
# digits it changes at most `steps` pixels, so its l1 cases are weak by design; their looser
# bounds are set from the measured values (in the comments) and still fail an attack that
# returns its inputs (ratio 1, hit rate ~0.01).
WEAK_L1_HIT = 0.1  # measured 0.15 - 0.28 (tifgsm 0.09 at seed 1: see its row)
STRONG: dict[str, Strong] = {
    "pgd": Strong(hit={"l1": WEAK_L1_HIT}),  # l1: robust 0.21 (ratio 0.22), hit 0.28
    # one step: targets hit 0.22 (linf), 0.29 (l2); l1: robust 0.78 (ratio 0.83), hit 0.03
    # (target margin up on 0.92-0.97 of points in all three)
    "fgsm": Strong(bound={"l1": 0.9}, hit={"linf": 0.15, "l2": 0.15, "l1": 0.0}),
    "bim": Strong(bound={"l1": 0.75}, hit={"l1": WEAK_L1_HIT}),  # l1: ratio 0.55, hit 0.21
    "mifgsm": Strong(bound={"l1": 0.75}, hit={"l1": WEAK_L1_HIT}),  # l1: ratio 0.61, hit 0.15
    "difgsm": Strong(hit={"l1": WEAK_L1_HIT}),  # l1: ratio 0.31, hit 0.28
    "tifgsm": Strong(bound={"l1": 0.75}, hit={"l1": 0.05}),  # l1: ratio 0.62, hit 0.09
    # the engine itself (surrogate kind) at its defaults: BIM's steps, the last iterate;
    # l1: ratio 0.55, hit 0.21
    "iterative": Strong(bound={"l1": 0.75}, hit={"l1": WEAK_L1_HIT}),
    # published 9 x 100 steps take 5 s here; 2 x 20 with a larger c and lr still break 97 %
    # and hit 64 % of targets (4 x 50: 99 %, 81 %, 3x the time)
    "cw": Strong({"steps": 20, "binary_steps": 2, "c": 10.0, "lr": 0.1}),
    "apgd-ce": Strong({"steps": 20}),
    "apgd-dlr": Strong({"steps": 20}),
    "apgd-t": Strong({"steps": 20, "n_target_classes": 3}),
    "fab": Strong({"steps": 20}),
    "fab-t": Strong({"steps": 20, "n_target_classes": 3}),
    "square": Strong({"queries": 300}),
    # untargeted only (refuses targets); the published 50 iterations
    "deepfool": Strong(hit=None),
    "autoattack": Strong({"attacks": ("apgd-ce", "apgd-t"), "version": "custom"}, hit=None),
    # Multi-exit attacks, on the net with trained exits. Their goals are their own:
    # DeepSloth lowers the early-exit efficacy, the exit PGD baselines the accuracy of the
    # exits they attack. Clean: efficacy 0.34, exit accuracies 0.62 / 0.46 / 0.84 / 0.94
    # (mean 0.72), all exits right on 0.33 of points. Adversarial / clean score measured at
    # 10 steps, linf / l2 / l1: deepsloth 0 / 0.01 / 0.32, pgd-avg 0.03 / 0.01 / 0.41,
    # pgd-final 0 / 0 / 0.28, pgd-max 0 / 0 / 0.30.
    "deepsloth": Strong({"steps": 10}, goal="slowdown", hit=None),
    "pgd-final": Strong({"steps": 10}, goal="final-exit", hit=None),
    "pgd-avg": Strong({"steps": 10}, goal="mean-exit", hit=None),
    "pgd-max": Strong({"steps": 10}, goal="every-exit", hit=None),
}


def _exit_accuracies(model: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per point and exit (ICs, then the final exit): the exit classifies it right."""
    with torch.no_grad():
        return torch.stack([o.argmax(1) == y for o in model.all_exits(x)], 1).float()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of the model's own output."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _efficacy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of computation early exits save (1 - mean cost / cost of the final exit)."""
    assert isinstance(model, MultiExitNetwork)
    return float(measure_efficiency(model, x, y, latency_samples=0).efficacy)


def _exits(reduce: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., float]:
    """A goal score from the per-point, per-exit correctness matrix."""

    def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """The reduced correctness of every exit on (x, y)."""
        assert isinstance(model, MultiExitNetwork)
        return float(reduce(_exit_accuracies(model, x, y)))

    return score


# goal -> score the attack must push down (clean score >= 0.33 on this data)
GOALS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], float]] = {
    "misclassify": _accuracy,
    "slowdown": _efficacy,
    "final-exit": _exits(lambda right: right[:, -1].mean()),
    "mean-exit": _exits(lambda right: right.mean()),
    "every-exit": _exits(lambda right: right.min(1).values.mean()),
}
N_STRONG = 100


def _strong(name: str) -> Strong:
    """The table's row for an attack name, or a loud failure saying what to add."""
    if name not in STRONG:
        pytest.fail(
            f"attack '{name}' is registered but has no row in STRONG (test_all_attacks.py): "
            "give the make_attack options, model and goal at which it must succeed"
        )
    row = STRONG[name]
    assert row.goal in GOALS, f"STRONG['{name}'] names an unknown goal '{row.goal}'"
    return row


def _model_for(name: str, request: pytest.FixtureRequest) -> nn.Module:
    """The trained model an attack needs: MODEL_FOR_KIND of its kind in the registry."""
    fixtures = {"net": "digits_net", "multi-exit": "digits_multiexit"}
    model: nn.Module = request.getfixturevalue(fixtures[MODEL_FOR_KIND[REGISTRY[name].kind]])
    return model


def _points(digits: DataSplits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first test digits, labels, and per point a target other than its label."""
    x, y = digits.test.x[:N_STRONG], digits.test.y[:N_STRONG]
    g = torch.Generator().manual_seed(0)
    return x, y, (y + torch.randint(1, 10, y.shape, generator=g)) % 10


def _check_goal(name: str, attack: Attack, norm: str, model: nn.Module, digits: DataSplits) -> None:
    """The attack's goal score falls to at most bound x the clean score, inside the budget."""
    row = _strong(name)
    x, y, _ = _points(digits)
    score = GOALS[row.goal]
    clean = score(model, x, y)
    assert clean > 0.2, f"the clean {row.goal} score {clean:.2f} leaves the attack no work"
    x_adv = attack(model, x, y)
    assert bool(ThreatModel(norm, STRONG_EPS[norm]).contains(x, x_adv).all())
    bound = row.bound.get(norm, 0.5)
    adv = score(model, x_adv, y)
    assert adv <= bound * clean, (
        f"{name} ({norm}, eps {STRONG_EPS[norm]}): {row.goal} score {adv:.2f} after the "
        f"attack, clean {clean:.2f}; it must fall to <= {bound} x clean"
    )


def test_every_registered_attack_has_a_success_row() -> None:
    missing = sorted(set(NAMES) - set(STRONG))
    assert not missing, f"add rows to STRONG (test_all_attacks.py) for {missing}"
    assert set(STRONG) <= set(NAMES), f"rows for unregistered names {set(STRONG) - set(NAMES)}"


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_every_attack_reaches_its_goal_on_a_trained_model(
    name: str, norm: str, digits: DataSplits, request: pytest.FixtureRequest
) -> None:
    row = _strong(name)
    attack = make_attack(name, norm, STRONG_EPS[norm], seed=1, **row.options)
    _check_goal(name, attack, norm, _model_for(name, request), digits)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_every_targeted_attack_reaches_its_targets(
    name: str, norm: str, digits: DataSplits, request: pytest.FixtureRequest
) -> None:
    row = _strong(name)
    model = _model_for(name, request)
    attack = make_attack(name, norm, STRONG_EPS[norm], seed=1, **row.options)
    x, y, targets = _points(digits)
    if row.hit is None:  # an attack without targets says so instead of ignoring them
        with pytest.raises(RobustlabError, match="target"):
            attack(model, x, y, targets)
        return
    x_adv = attack(model, x, y, targets)
    assert bool(ThreatModel(norm, STRONG_EPS[norm]).contains(x, x_adv).all())
    with torch.no_grad():
        before, after = model(x), model(x_adv)
    # most points (fewer for the weak cases of STRONG) end on their target
    hit = float((after.argmax(1) == targets).float().mean())
    need = row.hit.get(norm, 0.5)
    assert hit >= need, f"{name} ({norm}): {hit:.2f} of points on their target, need {need}"
    if need < 0.5:  # a weak case: still, the target's margin rises on (almost) every point
        # counted in points: 90 % as a float32 mean is 0.89999998 and would miss the bar
        rose = int((_target_margin(after, targets) > _target_margin(before, targets)).sum())
        assert rose >= 0.9 * len(x), f"{name} ({norm}): the target margin rose on {rose}/{len(x)}"


def _target_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per point: the target's logit minus the largest other logit (> 0: on target)."""
    own = logits.gather(1, targets[:, None])[:, 0]
    return own - logits.scatter(1, targets[:, None], float("-inf")).amax(1)
