"""AWP: on a linear model the perturbation and the update are the ones computed by hand; the
perturbation follows each method's own loss, raises it and leaves BatchNorm alone; the weights
are unperturbed between steps and in the checkpoint; the manifest records it; bad settings,
methods it does not apply to and a resume with another gamma are refused."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import robustlab
from robustlab.cli import main
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models.weights import layer_weight
from robustlab.train import EpochSampler, Hook, Step, TrainConfig, fit, make_method, train
from robustlab.train.awp import AWP, awp_hooks, perturbed_weights, weight_perturbation


class _Probe(Hook):
    """Records what it sees of the model (and the step's batch) around each step."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self.adversarial: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def start(self, model: nn.Module) -> None:
        """Watch the model being trained."""
        self.model = model

    def _weights(self) -> dict[str, torch.Tensor]:
        """A copy of every parameter."""
        assert self.model is not None
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}

    def before_forward(self, step: Step) -> None:
        """The weights the loss's forward pass will see if this probe runs after AWP."""
        self.before.append(self._weights())
        self.adversarial.append(step.adversarial.detach().clone())
        self.labels.append(step.y.clone())

    def after_step(self, step: Step) -> None:
        """The weights after the optimiser step (before AWP's after_step if installed after it)."""
        self.after.append(self._weights())


def _ce_gradient(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the mean cross-entropy of the linear model ``x w^T + b``, written out."""
    p = torch.softmax(x @ w.T + b, dim=1)
    err = p - nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    return err.T @ x / len(y), err.sum(0) / len(y)


def test_on_a_linear_model_the_perturbation_and_the_step_are_the_ones_by_hand(
    digits: DataSplits,
) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 10).double()
    model = nn.Sequential(nn.Flatten(), linear)
    x, y = digits.train.x[:16].double(), digits.train.y[:16]
    w0, b0 = linear.weight.detach().clone(), linear.bias.detach().clone()
    method = make_method("pgd-at", eps=0.1, steps=2)
    gamma, lr = 0.01, 0.5
    probe = _Probe()
    gen = torch.Generator().manual_seed(0)
    fit(
        model,
        method,
        torch.optim.SGD(model.parameters(), lr=lr),
        x,
        y,
        EpochSampler(16, torch.Generator().manual_seed(1)),
        batch_size=16,
        epochs=1,
        lr=lr,  # one step: the one-cycle schedule's first (and only) step is at the peak
        gen=gen,
        hooks=[AWP(method, gamma), probe],
    )
    x_adv = probe.adversarial[0].flatten(1)  # crafted at w0, before AWP
    y_seen = probe.labels[0]
    g0, _ = _ce_gradient(w0, b0, x_adv, y_seen)
    v = gamma * torch.linalg.vector_norm(w0) * g0 / torch.linalg.vector_norm(g0)
    seen = probe.before[0]
    torch.testing.assert_close(seen["1.weight"], w0 + v)  # the ascent direction, gamma*||w||
    assert float(torch.linalg.vector_norm(seen["1.weight"] - w0)) == pytest.approx(
        gamma * float(torch.linalg.vector_norm(w0)), rel=1e-9
    )
    assert torch.equal(seen["1.bias"], b0)  # biases are not perturbed
    g_w, g_b = _ce_gradient(w0 + v, b0, x_adv, y_seen)
    torch.testing.assert_close(linear.weight.detach(), w0 - lr * g_w)  # removed after the step
    torch.testing.assert_close(linear.bias.detach(), b0 - lr * g_b)
    # ... and the update is the one at w + v, not at w
    g_plain, _ = _ce_gradient(w0, b0, x_adv, y_seen)
    assert float((linear.weight.detach() - (w0 - lr * g_plain)).abs().max()) > 1e-4


def _bn_mlp() -> nn.Sequential:
    """A small mlp with BatchNorm on digits' 8x8 images, in train mode."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).train()


@pytest.mark.parametrize("name", ["pgd-at", "trades", "mart"])
def test_the_perturbation_ascends_the_methods_own_loss_and_leaves_batchnorm_alone(
    digits: DataSplits, name: str
) -> None:
    model = _bn_mlp()
    x, y = digits.train.x[:64], digits.train.y[:64]
    method = make_method(name, eps=0.2, steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = Step(model, opt, x, y, torch.arange(64), 0, 0, 1, torch.Generator().manual_seed(0))
    method.before_forward(step)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num" in k}
    # independent: the method's loss on a copy, its gradient per weight matrix
    twin = copy.deepcopy(model)
    weights = [layer_weight(twin[1]), layer_weight(twin[4])]
    grads = torch.autograd.grad(method.loss(twin, step), weights)
    before = float(method.loss(copy.deepcopy(model), step).detach())
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    gamma = 0.02
    hook = AWP(method, gamma)
    hook.before_forward(step)
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    for key, w, g in zip(["1.weight", "4.weight"], weights, grads, strict=True):
        want = gamma * torch.linalg.vector_norm(w.detach()) * g / torch.linalg.vector_norm(g)
        torch.testing.assert_close(after[key] - params[key], want)
    for key in ["1.bias", "2.weight", "2.bias", "4.bias"]:  # biases and BatchNorm untouched
        assert torch.equal(after[key], params[key])
    for key, value in stats.items():  # the ascent step moved no running statistic
        assert torch.equal(model.state_dict()[key], value)
    perturbed = float(method.loss(copy.deepcopy(model), step).detach())
    assert perturbed > before  # the loss at w + v is larger than at w
    hook.after_step(step)
    for key, value in params.items():
        torch.testing.assert_close(dict(model.named_parameters())[key].detach(), value)


def test_only_trainable_conv_and_linear_weights_are_perturbed() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 3))
    model[0].weight.requires_grad_(False)
    assert [id(w) for w in perturbed_weights(model)] == [id(layer_weight(model[3]))]


def test_a_layer_with_zero_gradient_is_not_perturbed(digits: DataSplits) -> None:
    """A layer the loss does not reach (zero gradient) gets no perturbation and no NaN."""
    model = _bn_mlp()
    with torch.no_grad():
        layer_weight(model[4]).zero_()  # no gradient flows back to the first linear layer
    method = make_method("pgd-at", eps=0.1, steps=1)
    x, y = digits.train.x[:8], digits.train.y[:8]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = Step(model, opt, x, y, torch.arange(8), 0, 0, 1, torch.Generator().manual_seed(0))
    method.before_forward(step)
    pairs = dict((id(w), v) for w, v in weight_perturbation(method, step, 0.01))
    assert torch.equal(pairs[id(layer_weight(model[1]))], torch.zeros_like(layer_weight(model[1])))
    assert torch.isfinite(pairs[id(layer_weight(model[4]))]).all()


def test_weights_are_unperturbed_between_steps_and_in_the_checkpoint_after_the_warmup(
    digits: DataSplits, tmp_path: Path
) -> None:
    """Probes before and after AWP: in the warm-up epoch the forward pass sees the plain
    weights; afterwards it sees them perturbed by gamma*||w|| per weight matrix, that
    perturbation is gone once the step is over, and the checkpoint holds the plain weights."""
    cfg = TrainConfig(
        arch="mlp",
        data="digits",
        method="pgd-at",
        eps=0.1,
        steps=1,
        epochs=2,
        arch_options={"width": 16},
    )
    gamma = 0.01
    early, late = _Probe(), _Probe()
    hooks = [early, *awp_hooks(cfg, gamma, warmup=1), late]
    result = train(cfg, tmp_path, splits=digits, progress=False, hooks=hooks)
    per_epoch = math.ceil(len(digits.train) / 64)
    assert len(early.before) == 2 * per_epoch
    matrices = [k for k in early.before[0] if k.endswith("weight")]
    assert len(matrices) == 3
    for i, (plain, seen) in enumerate(zip(early.before, late.before, strict=True)):
        for key in plain:
            if i < per_epoch or key not in matrices:  # warm-up epoch; biases
                assert torch.equal(seen[key], plain[key])
                continue
            size = float(torch.linalg.vector_norm(seen[key] - plain[key]))
            assert size == pytest.approx(gamma * float(torch.linalg.vector_norm(plain[key])))
        after_awp, before_awp = early.after[i], late.after[i]
        for key in matrices:  # what AWP removed is what it added
            torch.testing.assert_close(before_awp[key] - after_awp[key], seen[key] - plain[key])
        if i + 1 < len(early.before):  # the next step starts from the unperturbed weights
            assert all(torch.equal(after_awp[k], early.before[i + 1][k]) for k in plain)
    saved = dict(robustlab.load(tmp_path).named_parameters())
    for key, value in early.after[-1].items():
        assert torch.equal(saved[key].detach(), value)
    assert not torch.equal(saved[matrices[0]].detach(), late.after[-1][matrices[0]])
    assert result.manifest["training"]["add_ons"] == [
        {"name": "awp", "gamma": 0.01, "warmup_epochs": 1}
    ]


@pytest.mark.parametrize(
    ("gamma", "sentence"),
    [
        (0.0, "AWP needs a finite gamma > 0, got 0.0"),
        (-0.01, "AWP needs a finite gamma > 0, got -0.01"),
        (math.nan, "AWP needs a finite gamma > 0, got nan"),
        (math.inf, "AWP needs a finite gamma > 0, got inf"),
    ],
)
def test_a_bad_gamma_is_refused_in_one_sentence(gamma: float, sentence: str) -> None:
    with pytest.raises(RobustlabError, match=sentence):
        AWP(make_method("pgd-at", eps=0.1), gamma)


def test_methods_without_adversarial_examples_and_bad_warmups_are_refused() -> None:
    with pytest.raises(
        RobustlabError, match="AWP applies to pgd-at, trades, mart .*not to 'standard'"
    ):
        awp_hooks(TrainConfig(method="standard"), 0.005)
    cfg = TrainConfig(method="trades", eps=0.3, epochs=3)
    with pytest.raises(RobustlabError, match="warm-up of 3 epochs leaves none of the 3 epochs"):
        awp_hooks(cfg, 0.005, warmup=3)
    with pytest.raises(RobustlabError, match="warm-up is a number of epochs >= 0, got -1"):
        awp_hooks(cfg, 0.005, warmup=-1)
    with pytest.raises(RobustlabError, match="an AWP warm-up needs AWP"):
        awp_hooks(cfg, None, warmup=1)
    assert awp_hooks(cfg, None) == []
    (hook,) = awp_hooks(cfg, 0.005, warmup=2)
    assert hook.config() == {"name": "awp", "gamma": 0.005, "warmup_epochs": 2}


def test_the_command_line_trains_with_awp_resumes_only_with_the_same_gamma_and_refuses_bad_ones(
    digits: DataSplits, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "--arch", "mlp", "--data", "digits", "--no-progress"]
    adversarial = [*base, "--method", "pgd-at", "--eps", "0.1", "--steps", "1", "--epochs", "2"]
    assert main([*base, "--awp", "0.005", "--out", str(tmp_path / "std")]) == 2
    assert main([*adversarial, "--awp", "-1", "--out", str(tmp_path / "neg")]) == 2
    err = capsys.readouterr().err
    assert "AWP applies to pgd-at, trades, mart" in err and "not to 'standard'" in err
    assert "AWP needs a finite gamma > 0, got -1.0" in err and err.count("\n") == 2
    assert not (tmp_path / "std").exists() and not (tmp_path / "neg").exists()

    cfg = TrainConfig(arch="mlp", data="digits", method="pgd-at", eps=0.1, steps=1, epochs=2)
    out = tmp_path / "run"
    train(cfg, out, splits=digits, progress=False, hooks=awp_hooks(cfg, 0.01), stop_after_epochs=1)
    with pytest.raises(RobustlabError, match="unfinished run with other add-ons"):
        train(cfg, out, splits=digits, progress=False, hooks=awp_hooks(cfg, 0.005))
    js = tmp_path / "m.json"
    assert main([*adversarial, "--awp", "0.01", "--out", str(out), "--json", str(js)]) == 0
    manifest = json.loads(js.read_text())
    assert manifest["training"]["add_ons"] == [{"name": "awp", "gamma": 0.01, "warmup_epochs": 0}]
    assert "resume.pt" not in {p.name for p in out.iterdir()}
