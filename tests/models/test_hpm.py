"""The HPM l2-reclassifier head: shapes, modes, batch dependence, prototypes, the STE,
surrogates, checkpoints and bad settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks.registry import make_attack
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.checkpoint import load_checkpoint, model_config, save_checkpoint
from robustlab.models.hpm import (
    SURROGATES,
    HPMClassifier,
    HPMConfig,
    assignment,
    init_prototypes,
    l2_logits,
    mixed_prototypes,
    model_section,
    with_config,
    with_mode,
)
from robustlab.models.multiexit import MultiExitNetwork, attach_exits
from robustlab.models.structure import declare_features, surrogates_for


class Plain(nn.Module):
    """Features are the inputs themselves (N x 2); the FC head is the identity matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(x)
        return logits


class Small(nn.Module):
    """A small foreign network on 4 inputs with 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.body(x))
        return logits


@pytest.fixture(autouse=True)
def _declared() -> Iterator[None]:
    """The test networks name their head as a foreign model would, with one call each."""
    undo = [declare_features(Plain, "fc"), declare_features(Small, "fc")]
    yield
    for u in undo:
        u()


def small_hpm(**options: Any) -> tuple[HPMClassifier, torch.Tensor, torch.Tensor]:
    """An HPM head on a seeded Small network, prototypes from 60 random points."""
    torch.manual_seed(0)
    model = HPMClassifier(Small(), HPMConfig(**options)).eval()
    x = torch.rand(60, 4)
    y = torch.arange(60) % 3
    init_prototypes(model, x, y)
    return model, x, y


def test_logits_have_one_column_per_class() -> None:
    model, x, _ = small_hpm()
    assert model(x[:7]).shape == (7, 3)
    assert model.prototypes.shape == (3, 6) and model.feature_dim == 6


@pytest.mark.parametrize("mode", ["mix", "ema"])
def test_batch_size_one_works_in_both_modes(mode: str) -> None:
    model, x, _ = small_hpm()
    with with_mode(model, mode):
        out = model(x[:1])
    assert out.shape == (1, 3) and bool(torch.isfinite(out).all())


def test_ema_mode_predictions_do_not_depend_on_the_batch() -> None:
    model, x, _ = small_hpm()
    with with_mode(model, "ema"):
        together = model(x[:20])
        alone = torch.cat([model(x[i : i + 1]) for i in range(20)])
    torch.testing.assert_close(together, alone)


def test_mix_mode_prediction_can_flip_with_the_rest_of_the_batch() -> None:
    # features = inputs; the FC head predicts the larger coordinate; mix = 1
    model = HPMClassifier(Plain(), HPMConfig(mix=1.0)).eval()
    with torch.no_grad():
        model.prototypes.copy_(torch.eye(2))
    a = torch.tensor([[0.55, 0.45]])
    batch = torch.tensor([[0.55, 0.45], [1.0, 0.0], [0.45, 0.55]])
    with torch.no_grad():
        assert int(model(a).argmax(1)) == 0  # alone: its own class-0 prototype is itself
        assert int(model(batch)[0].argmax()) == 1  # others moved both batch prototypes
        with with_mode(model, "ema"):
            assert int(model(a).argmax(1)) == int(model(batch)[0].argmax())


def test_with_mode_restores_the_mode_even_after_an_error() -> None:
    model, x, _ = small_hpm()
    with pytest.raises(ValueError), with_mode(model, "ema"):
        assert model.mode == "ema"
        raise ValueError
    assert model.mode == "mix"
    with (
        pytest.raises(RobustlabError, match="unknown HPM mode 'both'; use mix or ema"),
        with_mode(model, "both"),
    ):
        pass


def test_with_config_changes_settings_for_a_while_and_checks_them() -> None:
    model, x, _ = small_hpm()
    own = model.config
    with torch.no_grad():
        with with_mode(model, "ema"):
            ema = model(x[:5])
        with with_config(model, mix=0.0) as changed:
            assert changed.config.mix == 0.0 and changed.mode == "mix"
            torch.testing.assert_close(model(x[:5]), ema)  # mix 0: the dataset prototypes
        assert model.config is own and not torch.allclose(model(x[:5]), ema)
        with with_config(model, scale=4.0, mode="ema"):
            assert model.mode == "ema"
            torch.testing.assert_close(model(x[:5]), 2 * ema)  # logits linear in the scale
        assert model.mode == "mix"
    with (
        pytest.raises(RobustlabError, match=r"mixing weight must lie in \[0, 1\]"),
        with_config(model, mix=2.0),
    ):
        pass
    with pytest.raises(RobustlabError, match="unknown HPM setting"), with_config(model, mixing=0.2):
        pass
    assert model.config is own


def test_absent_classes_fall_back_to_the_dataset_prototype() -> None:
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    f = torch.tensor([[0.2, 0.4], [0.6, 0.0]])
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # both assigned to class 0
    p = mixed_prototypes(f, a, mu, 0.25)
    assert torch.equal(p[1:], mu[1:])
    torch.testing.assert_close(p[0], 0.75 * mu[0] + 0.25 * f.mean(0))
    # a single point: only its predicted class moves, the others keep the ema logits
    model, x, _ = small_hpm()
    with torch.no_grad():
        out = model(x[:1])
        with with_mode(model, "ema"):
            ema = model(x[:1])
        c = int(model.base(x[:1]).argmax(1))
    others = [k for k in range(3) if k != c]
    assert torch.equal(out[0, others], ema[0, others])
    assert float(out[0, c]) > float(ema[0, c])  # its prototype moved halfway to itself


def test_logits_are_scaled_l2_distances_to_the_mixed_prototypes() -> None:
    model, x, _ = small_hpm(scale=3.0, mix=0.0)
    with torch.no_grad():
        f, _ = model.features_and_logits(x[:5])
        expected = -3.0 * torch.cdist(f, model.prototypes) / model.distance_unit
        torch.testing.assert_close(model(x[:5]), expected)  # mix 0: the dataset prototypes


def test_prototypes_never_move_in_a_forward_pass_or_under_attack() -> None:
    model, x, y = small_hpm()
    before = model.prototypes.clone()
    model.train()
    model(x)
    model.eval()
    attack = make_attack("pgd", "linf", 0.1, steps=3)
    attack.run(model, x[:10], y[:10])
    for _, surrogate in surrogates_for(model):
        surrogate(x[:10]).sum().backward()
    assert torch.equal(model.prototypes, before)


def test_ema_update_follows_its_formula_and_leaves_absent_classes() -> None:
    model, _, _ = small_hpm(momentum=0.8)
    mu = model.prototypes.clone()
    f = torch.rand(4, 6)
    y = torch.tensor([0, 2, 0, 2])
    model.update_prototypes(f, y)
    torch.testing.assert_close(model.prototypes[0], 0.8 * mu[0] + 0.2 * (f[0] + f[2]) / 2)
    torch.testing.assert_close(model.prototypes[2], 0.8 * mu[2] + 0.2 * (f[1] + f[3]) / 2)
    assert torch.equal(model.prototypes[1], mu[1])


def test_init_sets_class_means_and_the_distance_unit_and_needs_every_class() -> None:
    model, x, y = small_hpm()
    with torch.no_grad():
        f, _ = model.features_and_logits(x)
    for c in range(3):
        torch.testing.assert_close(model.prototypes[c], f[y == c].mean(0))
    own = (f - model.prototypes[y]).norm(dim=1).mean()
    torch.testing.assert_close(model.distance_unit, own)
    with pytest.raises(RobustlabError, match=r"every class .* classes \[1\] have none"):
        init_prototypes(model, x[y != 1], y[y != 1])


def _loss_of_assignment(f: torch.Tensor, a: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """A fixed loss of the mixed-prototype logits, as a function of the assignment."""
    logits = l2_logits(f, mixed_prototypes(f, a, mu, 0.5), 2.0)
    return F.cross_entropy(logits, torch.tensor([1, 0, 2, 1, 0]))


def test_ste_forward_is_the_hard_one_and_its_gradient_the_soft_one() -> None:
    torch.manual_seed(1)
    f, mu = torch.randn(5, 4), torch.randn(3, 4)
    z = torch.randn(5, 3, requires_grad=True)
    t = 0.7
    hard = assignment(z, t, ste=False, kind="hard")
    ste = assignment(z, t, ste=True, kind="hard")
    assert torch.equal(ste, hard) and torch.equal(hard.sum(1), torch.ones(5))
    loss_ste = _loss_of_assignment(f, ste, mu)
    assert torch.equal(loss_ste, _loss_of_assignment(f, hard, mu))  # same forward, exactly
    (grad_ste,) = torch.autograd.grad(loss_ste, z)
    # the STE gradient: dL/dA at the hard assignment, carried back through softmax(z / t)
    a_leaf = hard.detach().clone().requires_grad_(True)
    (g_a,) = torch.autograd.grad(_loss_of_assignment(f, a_leaf, mu), a_leaf)
    (expected,) = torch.autograd.grad(F.softmax(z / t, dim=1), z, grad_outputs=g_a)
    torch.testing.assert_close(grad_ste, expected)
    assert float(grad_ste.abs().sum()) > 0


def test_without_ste_the_assignment_carries_no_gradient() -> None:
    model, x, _ = small_hpm(ste=False)
    f, z = model.features_and_logits(x[:8])
    out = model.hpm_logits(f.detach(), z)
    assert not out.requires_grad  # only the assignment reads z, and it is hard
    with_ste = model.hpm_logits(f.detach(), z, ste=True)
    (g,) = torch.autograd.grad(with_ste.sum() + 0 * z.sum(), z)
    assert float(g.abs().sum()) > 0  # the STE does carry one


def test_surrogates_share_the_models_parameters_and_buffers() -> None:
    model, _, _ = small_hpm()
    found = surrogates_for(model)
    assert [name for name, _ in found] == list(SURROGATES)
    params = {id(p) for p in model.parameters()}
    buffers = {id(b) for b in model.buffers()}
    for _, s in found:
        assert {id(p) for p in s.parameters()} == params
        assert {id(b) for b in s.buffers()} == buffers


def test_surrogates_compute_what_they_are_named_for() -> None:
    model, x, _ = small_hpm()
    s = dict(surrogates_for(model))
    xb = x[:12]
    with torch.no_grad():
        assert torch.equal(s["hpm-ste"](xb), model(xb))
        assert torch.equal(s["hpm-detached"](xb), model(xb))
        assert torch.equal(s["fc"](xb), model.base(xb))
        with with_mode(model, "ema"):
            assert torch.equal(s["l2-ema"](xb), model(xb))
            assert torch.equal(s["hpm-ste"](xb), s["hpm-detached"](xb))  # still the mix forward
        f, z = model.features_and_logits(xb)
        soft = mixed_prototypes(f, F.softmax(z, 1), model.prototypes, 0.5)
        scale = 2.0 / model.distance_unit
        torch.testing.assert_close(s["hpm-soft"](xb), l2_logits(f, soft, scale))


def test_the_ste_surrogate_follows_the_model_even_when_the_model_has_no_ste() -> None:
    model, x, _ = small_hpm(ste=False)
    s = dict(surrogates_for(model))
    xb = x[:12].clone().requires_grad_(True)
    assert torch.equal(s["hpm-ste"](xb), model(xb))
    (g_ste,) = torch.autograd.grad(F.cross_entropy(s["hpm-ste"](xb), torch.zeros(12).long()), xb)
    (g_no,) = torch.autograd.grad(F.cross_entropy(model(xb), torch.zeros(12).long()), xb)
    assert not torch.allclose(g_ste, g_no)
    # detaching the batch prototypes changes the gradient too
    (g_det,) = torch.autograd.grad(
        F.cross_entropy(s["hpm-detached"](xb), torch.zeros(12).long()), xb
    )
    assert not torch.allclose(g_ste, g_det)


@pytest.mark.parametrize("name", SURROGATES)
def test_every_surrogate_takes_batch_size_one_and_leaves_the_model_as_it_was(name: str) -> None:
    model, x, _ = small_hpm()
    model.train()
    surrogate = dict(surrogates_for(model))[name]
    before = model.prototypes.clone()
    xb = x[:1].clone().requires_grad_(True)
    out = surrogate(xb)
    (g,) = torch.autograd.grad(out[0, 0], xb)
    assert out.shape == (1, 3) and bool(torch.isfinite(g).all())
    assert model.training and model.base.training and model.mode == "mix"
    assert torch.equal(model.prototypes, before)


def test_a_checkpoint_round_trip_rebuilds_the_same_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = build_model("mlp", 1, 10, 8)
    model = HPMClassifier(base, HPMConfig(mix=0.3, momentum=0.95, scale=2.0)).eval()
    with torch.no_grad():
        model.prototypes.copy_(torch.randn_like(model.prototypes))
        model.distance_unit.fill_(0.7)
    section = model_section(model_config("mlp", 1, 10, 8, [0.0], [1.0]), model, "ab" * 32)
    save_checkpoint(model, tmp_path / "c", {"model": section})
    ckpt = load_checkpoint(tmp_path / "c")
    loaded = ckpt.model
    assert isinstance(loaded, HPMClassifier) and not loaded.training
    x = torch.rand(9, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.prototypes, model.prototypes)
    assert float(loaded.distance_unit) == pytest.approx(0.7)
    hpm = ckpt.manifest["model"]["hpm"]
    assert hpm["base_sha256"] == "ab" * 32 and hpm["feature_dim"] == model.feature_dim
    assert HPMConfig.from_dict(hpm["config"]) == model.config


def test_an_hpm_head_over_a_multi_exit_network_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    exits = attach_exits(build_model("mlp", 1, 10, 8), (1, 8, 8), 10, [0])
    model = HPMClassifier(exits, HPMConfig(mode="ema")).eval()
    with torch.no_grad():
        model.prototypes.copy_(torch.randn_like(model.prototypes))
    base = {**model_config("mlp", 1, 10, 8, [0.0], [1.0]), "multi_exit": exits.config()}
    save_checkpoint(model, tmp_path / "c", {"model": model_section(base, model, None)})
    loaded = load_checkpoint(tmp_path / "c").model
    assert isinstance(loaded, HPMClassifier) and isinstance(loaded.base, MultiExitNetwork)
    x = torch.rand(3, 1, 8, 8)
    assert loaded.mode == "ema" and torch.equal(loaded(x), model(x))


def test_a_manifest_with_a_bad_hpm_config_is_refused(tmp_path: Path) -> None:
    model = HPMClassifier(build_model("mlp", 1, 10, 8))
    section = model_section(model_config("mlp", 1, 10, 8, [0.0], [1.0]), model, None)
    section["hpm"]["config"]["mix"] = 1.5
    save_checkpoint(model, tmp_path / "c", {"model": section})
    with pytest.raises(RobustlabError, match=r"mixing weight must lie in \[0, 1\], got 1.5"):
        load_checkpoint(tmp_path / "c")


@pytest.mark.parametrize(
    ("edit", "sentence"),
    [
        ({"hpm": "yes"}, "has an invalid hpm section"),
        ({"feature_dim": 7}, "records 7 features but its model has 256"),
        ({"config": {"mix": 0.5, "depth": 3}}, "has an invalid hpm config"),
    ],
)
def test_a_manifest_with_a_broken_hpm_section_is_refused(
    tmp_path: Path, edit: dict[str, Any], sentence: str
) -> None:
    model = HPMClassifier(build_model("mlp", 1, 10, 8))
    section = model_section(model_config("mlp", 1, 10, 8, [0.0], [1.0]), model, None)
    if "hpm" in edit:
        section["hpm"] = edit["hpm"]
    else:
        section["hpm"].update(edit)
    save_checkpoint(model, tmp_path / "c", {"model": section})
    with pytest.raises(RobustlabError, match=sentence):
        load_checkpoint(tmp_path / "c")


@pytest.mark.parametrize(
    ("options", "sentence"),
    [
        ({"mix": 1.5}, r"mixing weight must lie in \[0, 1\], got 1.5"),
        ({"mix": -0.1}, r"mixing weight must lie in \[0, 1\]"),
        ({"mix": float("nan")}, r"mixing weight must lie in \[0, 1\], got nan"),
        ({"momentum": 0.0}, r"momentum must lie strictly between 0 and 1, got 0.0"),
        ({"momentum": 1.0}, r"momentum must lie strictly between 0 and 1, got 1.0"),
        ({"momentum": 1.5}, r"momentum must lie strictly between 0 and 1"),
        ({"scale": 0.0}, r"logit scale must be a finite number > 0, got 0.0"),
        ({"scale": float("inf")}, r"logit scale must be a finite number > 0, got inf"),
        ({"temperature": -1.0}, r"STE temperature must be a finite number > 0"),
        ({"mode": "batch"}, r"unknown HPM mode 'batch'; use mix or ema"),
    ],
)
def test_bad_settings_are_refused_with_one_sentence(options: dict[str, Any], sentence: str) -> None:
    with pytest.raises(RobustlabError, match=sentence) as info:
        HPMConfig(**options)
    assert "\n" not in str(info.value)


def test_a_model_without_a_findable_head_says_how_to_declare_it() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(RobustlabError, match="declare_features"):
        HPMClassifier(net)
