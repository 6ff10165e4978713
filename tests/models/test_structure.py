"""The structure module: units, residual sites, exit points and penultimate features of every
zoo architecture, and of a foreign model declared with one call each."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from robustlab.analysis.flops import count_flops, head_flops, unit_flops
from robustlab.analysis.transfer import default_gamma
from robustlab.attacks import transforms
from robustlab.errors import RobustlabError
from robustlab.models import ARCHITECTURES, Normalize, attach_exits, build_model, structure
from robustlab.models.structure import (
    Plan,
    classifier_head,
    declare_features,
    declare_units,
    exit_points,
    feature_shape,
    find_residual_sites,
    penultimate_features,
    plan_for,
    run_steps,
    weight_layers,
)

SHAPE = (1, 8, 8)

#: (units, residual sites, SGM power per site, how the branch merges) of each zoo architecture
#: at its default options on 8x8 inputs.
EXPECTED: dict[str, tuple[int, int, float, str]] = {
    "resnet8": (1 + 3, 3, 1.0, "add"),
    "resnet14": (1 + 6, 6, 1.0, "add"),
    "resnet20": (1 + 9, 9, 1.0, "add"),
    "resnet": (1 + 9, 9, 1.0, "add"),
    "preact_resnet": (1 + 9, 9, 1.0, "add"),
    "preact_resnet8": (1 + 3, 3, 1.0, "add"),
    "vgg": (3, 0, 1.0, "add"),
    "vgg11": (6, 0, 1.0, "add"),
    "densenet": (1 + 12, 12, 1.0, "concat"),
    "vit": (1 + 4, 8, 0.5, "add"),
    "mlp": (2, 0, 1.0, "add"),
}


def _zoo(arch: str) -> nn.Sequential:
    torch.manual_seed(0)
    return build_model(arch, SHAPE[0], 10, SHAPE[1]).eval()


def test_every_registered_architecture_is_described() -> None:
    assert set(EXPECTED) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_units_run_in_order_are_the_forward_pass(arch: str) -> None:
    model = _zoo(arch)
    plan = plan_for(model, root="")
    units, _, _, _ = EXPECTED[arch]
    assert len(plan.units) == len(plan.names) == units
    assert plan.units[0][0] == ("call", "normalize")
    assert exit_points(model) == list(plan.names[:-1])
    x = torch.rand(3, *SHAPE)
    h = x
    with torch.no_grad():
        for unit in plan.units:
            h = run_steps(model, unit, h)
        out = run_steps(model, plan.head, h)
        assert torch.equal(out, model(x))


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_residual_sites(arch: str) -> None:
    model = _zoo(arch)
    _, count, power, merge = EXPECTED[arch]
    sites = find_residual_sites(model)
    assert len(sites) == count
    assert all(s.power == power and s.merge == merge for s in sites)
    assert all(s.branch is not None and s.ends == (s.branch,) for s in sites)
    if sites:
        want = 0.5 if merge == "concat" else (0.6 if power == 0.5 else 0.2)
        assert default_gamma(model) == want
    # SGM asks the structure module: the same sites, not a second search
    assert transforms.find_residual_sites is structure.find_residual_sites
    assert transforms.declare_residual is structure.declare_residual


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_penultimate_features_are_what_the_final_linear_layer_reads(arch: str) -> None:
    model = _zoo(arch)
    head = classifier_head(model)
    assert isinstance(head, nn.Linear)
    assert head is model.get_submodule("net.fc")
    assert feature_shape(model, SHAPE) == (head.in_features,)
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():
        features = penultimate_features(model, x)
        assert features.shape == (4, head.in_features)
        assert torch.equal(head(features), model(x))


def test_a_multi_exit_network_keeps_its_backbone_head() -> None:
    backbone = _zoo("resnet8")
    model = attach_exits(backbone, SHAPE, 10, [0, 1])
    assert classifier_head(model) is backbone.get_submodule("net.fc")  # not an exit head
    assert feature_shape(model, SHAPE) == feature_shape(backbone, SHAPE)


def test_weight_layers_are_every_conv_and_linear_layer() -> None:
    layers = dict(weight_layers(_zoo("resnet8")))
    # stem conv, two convs per block, 1x1 shortcuts where the shape changes, the linear head
    assert len(layers) == 1 + 3 * 2 + 2 + 1
    assert sum(isinstance(m, nn.Linear) for m in layers.values()) == 1
    assert "net.fc" in layers and "net.blocks.1.shortcut.0" in layers
    assert [n for n, _ in weight_layers(_zoo("mlp"))] == [
        "net.features.1",
        "net.features.3",
        "net.fc",
    ]


class Foreign(nn.Module):
    """A network robustlab knows nothing about: two conv stages and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.pool(self.second(self.first(x))))
        return logits


def _foreign_units(net: Foreign) -> Plan:
    return Plan(
        ((("call", "first"),), (("call", "second"),)),
        ("first", "second"),
        (("call", "pool"), ("call", "classifier")),
    )


def test_foreign_features_are_declared_with_one_call() -> None:
    net = Foreign().eval()
    with pytest.raises(RobustlabError, match="declare_features"):
        classifier_head(net)
    undo = declare_features(Foreign, "classifier")
    try:
        assert classifier_head(net) is net.classifier
        assert feature_shape(net, SHAPE) == (6,)
        x = torch.rand(2, *SHAPE)
        with torch.no_grad():
            assert torch.equal(net.classifier(penultimate_features(net, x)), net(x))
        two = nn.Sequential(Foreign(), Foreign())
        with pytest.raises(RobustlabError, match="2 declared classifier heads"):
            classifier_head(two)
    finally:
        undo()
    with pytest.raises(RobustlabError, match="no declared classifier heads"):
        classifier_head(net)
    undo = declare_features(net, lambda n: n.get_submodule("classifier"))  # one instance
    try:
        assert classifier_head(net) is net.classifier
        with pytest.raises(RobustlabError, match="no declared"):
            classifier_head(Foreign())
    finally:
        undo()
    undo = declare_features(Foreign, "nope")
    try:
        with pytest.raises(RobustlabError, match="no such submodule"):
            classifier_head(net)
    finally:
        undo()
    with pytest.raises(RobustlabError, match="nn.Module"):
        declare_features(int, "fc")  # type: ignore[arg-type]  # bad arguments on purpose


def test_a_new_architecture_takes_exits_once_it_declares_its_units() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(OrderedDict(normalize=Normalize([0.0], [1.0]), net=Foreign())).eval()
    with pytest.raises(RobustlabError, match="declares no units"):
        attach_exits(backbone, SHAPE, 10)
    undo = declare_units(Foreign, _foreign_units)
    try:
        model = attach_exits(backbone, SHAPE, 10, [0])
        assert model.exit_names() == ["after first", "final"]
        x = torch.rand(3, *SHAPE)
        outs = model.all_exits(x)
        assert len(outs) == 2 and torch.equal(outs[-1], backbone(x))
        assert sum(unit_flops(model)) + head_flops(model) == count_flops(
            backbone, torch.zeros(1, *SHAPE)
        )
    finally:
        undo()
    with pytest.raises(RobustlabError, match="declares no units"):
        plan_for(backbone)


def test_surrogates_are_declared_with_one_call_and_undone() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(RobustlabError, match="no declared surrogates"):
        structure.surrogates_for(net)
    other = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    undo = structure.declare_surrogates(net, lambda m: [("self", m), ("other", other)])
    found = structure.surrogates_for(net)
    assert [n for n, _ in found] == ["self", "other"]
    with pytest.raises(RobustlabError, match="no declared surrogates"):
        # a wrapper's inputs are not its submodule's: it declares its own
        structure.surrogates_for(nn.Sequential(nn.Identity(), net))
    assert found[0][1] is net and found[1][1] is other
    undo()
    with pytest.raises(RobustlabError, match="no declared surrogates"):
        structure.surrogates_for(net)


def test_surrogates_with_repeated_names_are_refused() -> None:
    net = nn.Linear(4, 3)
    undo = structure.declare_surrogates(net, lambda m: [("a", m), ("a", m)])
    try:
        with pytest.raises(RobustlabError, match="repeated"):
            structure.surrogates_for(net)
    finally:
        undo()
