"""Transfer matrices: one generation per source and attack, both conventions, records, bad input."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from robustlab.analysis.transfer import (
    TransferAttack,
    default_gamma,
    gamma_sweep,
    gradient_alignment,
    parse_attack,
    skip_branch_split,
    transfer_matrix,
)
from robustlab.attacks.base import Attack
from robustlab.attacks.iterative import IterativeAttack
from robustlab.attacks.surrogate import Ensemble
from robustlab.data import Dataset, DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.blocks import DenseLayer, ResidualBlock
from robustlab.report.transfer_plots import (
    gamma_sweep_plot,
    transfer_heatmap,
    transfer_section_html,
)
from robustlab.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(digits: DataSplits, tmp_path_factory: pytest.TempPathFactory) -> dict[str, nn.Module]:
    """A ResNet and an MLP trained briefly on digits."""
    out = tmp_path_factory.mktemp("transfer-models")
    models = {}
    for arch, epochs in (("resnet8", 2), ("mlp", 3)):
        cfg = TrainConfig(arch=arch, data="digits", epochs=epochs)
        models[arch] = train(cfg, out / arch, splits=digits, progress=False).model.eval()
    return models


@dataclass(frozen=True)
class Counting(Attack):
    """Moves every pixel by +eps (clipped) and counts its calls."""

    norm: str = "linf"
    eps: float = 0.2
    calls: ClassVar[list[int]] = []

    name: ClassVar[str] = "counting"

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.calls.append(len(x))
        return (x + self.eps).clamp(0, 1)


class CountForward(nn.Module):
    """Wraps a model and counts its forward passes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits: torch.Tensor = self.inner(x)
        return logits


def _untrained(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, image_size=8).eval()


def test_cost_is_one_generation_per_source_and_attack(digits: DataSplits) -> None:
    Counting.calls.clear()
    sources = {"s1": _untrained("mlp", 1), "s2": _untrained("mlp", 2)}
    targets = {f"t{i}": CountForward(_untrained("mlp", 10 + i)) for i in range(3)}
    attacks = [TransferAttack("a", Counting()), TransferAttack("b", Counting())]
    # counted in PyTorch: the ONNX engine's probe and passes would bypass the counter
    result = transfer_matrix(
        sources, targets, attacks, digits.test, n=50, batch_size=64, engine="torch"
    )
    s, t, a = len(sources), len(targets), len(attacks)
    assert len(Counting.calls) == s * a  # not s * t * a
    assert result.generations == s * a
    assert result.target_forwards == t * (1 + s * a)
    for target in targets.values():
        assert target.calls == 1 + 1 + s * a  # input check, clean pass, one per crafted set
    assert len(result.cells) == s * t * a


def test_both_conventions_are_recorded_and_consistent(digits: DataSplits) -> None:
    target = _untrained("mlp", 4)
    result = transfer_matrix(
        {"src": _untrained("mlp", 3)},
        {"tgt": target, "src-again": target},
        [TransferAttack("shift", Counting())],
        digits.test,
        n=120,
    )
    cell = result.cell("src", "tgt", "shift")
    x, y = digits.test.x[:120], digits.test.y[:120]
    with torch.no_grad():
        clean_ok = target(x).argmax(1) == y
        adv_wrong = target((x + 0.2).clamp(0, 1)).argmax(1) != y
    assert cell.n == int(clean_ok.sum()) and cell.n_all == 120
    assert math.isclose(cell.success_rate, float((adv_wrong & clean_ok).sum()) / cell.n)
    assert math.isclose(cell.success_rate_all, float(adv_wrong.sum()) / 120)
    assert math.isclose(cell.target_adversarial_accuracy, 1 - cell.success_rate_all, rel_tol=1e-6)
    assert math.isclose(cell.target_clean_accuracy, float(clean_ok.sum()) / 120, rel_tol=1e-6)
    assert not cell.white_box and cell.gamma is None


def test_real_matrix_with_sgm_marks_white_box_and_writes_json(
    digits: DataSplits, trained: dict[str, nn.Module], tmp_path: Path
) -> None:
    attacks = [parse_attack(a, "linf", 0.2, steps=5) for a in ("pgd", "sgm", "sgm+mi+di")]
    seen: list[str] = []
    result = transfer_matrix(
        {"resnet8": trained["resnet8"]},
        dict(trained),
        attacks,
        digits.test,
        n=100,
        on_cell=lambda c: seen.append(c.target),
    )
    assert len(result.cells) == len(seen) == 6
    white = result.cell("resnet8", "resnet8", "pgd")
    assert white.white_box and white.success_rate > 0.9
    assert math.isclose(white.source_success_rate, white.success_rate)
    assert not result.cell("resnet8", "mlp", "pgd").white_box
    assert result.cell("resnet8", "mlp", "sgm").gamma == 0.2  # the ResNet default
    for c in result.cells:
        assert 0 <= c.success_rate <= 1 and c.n > 80
    record = json.loads(json.dumps(result.to_dict()))
    assert record["kind"] == "transfer"
    for spec in record["attacks"]:  # the registry's pgd, run with the protocol's options
        assert spec["base"] == "pgd" and spec["engine"]["returns"] == "last"
        assert spec["options"] == {
            "steps": 5,
            "alpha": 2.5 * 0.2 / 5,
            "random_start": False,
            "returns": "last",
            "seed": 0,
        }
    for c in record["cells"]:
        assert {"source", "target", "attack", "success_rate", "n"} <= set(c)
    assert "*" in result.table() and "sgm+mi+di" in result.table()
    heat = transfer_heatmap(result, tmp_path / "heat.png")
    assert heat.exists() and heat.stat().st_size > 1000
    section = transfer_section_html(record)
    assert section.count("<tr>") == 1 + 3 and "data:image/png;base64," in section
    assert "sgm+mi+di γ=0.2" in section and "*" in section


def test_gamma_sweep_records_each_gamma(digits: DataSplits, trained: dict[str, nn.Module]) -> None:
    gammas = [0.1, 0.5, 1.0]
    sweep = gamma_sweep(parse_attack("sgm", "linf", 0.2, steps=3), gammas)
    result = transfer_matrix(
        {"r": trained["resnet8"]}, {"m": trained["mlp"]}, sweep, digits.test, n=60
    )
    assert [c.gamma for c in result.cells] == gammas
    assert result.generations == len(gammas)
    with pytest.raises(RobustlabError, match="needs an SGM attack"):
        gamma_sweep(parse_attack("mi", "linf", 0.2), gammas)
    with pytest.raises(RobustlabError, match=r"gamma must lie in \(0, 1\]"):
        gamma_sweep(parse_attack("sgm", "linf", 0.2), [0.5, 1.2])


def test_gamma_sweep_plot(digits: DataSplits, tmp_path: Path) -> None:
    sweep = gamma_sweep(parse_attack("sgm", "linf", 0.2, steps=1), [0.2, 1.0])
    result = transfer_matrix(
        {"r": _untrained("resnet8", 0)}, {"m": _untrained("mlp", 1)}, sweep, digits.test, n=20
    )
    out = gamma_sweep_plot(result, tmp_path / "sweep.png")
    assert out.exists() and out.stat().st_size > 1000


def test_targeted_matrix_counts_hits_on_the_target_label(
    digits: DataSplits, trained: dict[str, nn.Module]
) -> None:
    attack = parse_attack("mi", "linf", 0.3, steps=5)
    result = transfer_matrix(
        {"r": trained["resnet8"]},
        {"r": trained["resnet8"]},
        [attack],
        digits.test,
        n=60,
        targeted=True,
    )
    cell = result.cell("r", "r", "mi")
    assert result.targeted and cell.white_box and cell.success_rate > 0.5


def test_ensemble_source(digits: DataSplits, trained: dict[str, nn.Module]) -> None:
    ens = Ensemble([trained["resnet8"], trained["mlp"]]).eval()
    result = transfer_matrix(
        {"ens": ens},
        dict(trained),
        [parse_attack("sgm+mi", "linf", 0.2, steps=3)],
        digits.test,
        n=40,
    )
    assert all(c.white_box for c in result.cells)  # both targets are members


def test_parse_attack() -> None:
    a = parse_attack("sgm+mi+di", "linf", 0.1)
    engine = a.attack
    assert isinstance(engine, IterativeAttack)
    assert a.sgm and a.gamma is None and a.linbp_block is None
    assert engine.decay == 1.0 and engine.diversity_prob == 0.5
    assert engine.steps == 10 and math.isclose(engine.step_size, 0.025)
    f = parse_attack("fgsm+sgm", "l2", 1.0, gamma=0.5)
    assert isinstance(f.attack, IterativeAttack)
    assert f.attack.steps == 1 and f.gamma == 0.5
    assert parse_attack("pgd+linbp", "linf", 0.1).linbp_block == -2
    assert parse_attack("mifgsm", "linf", 0.1).label == "mifgsm"
    with pytest.raises(RobustlabError, match="unknown transfer attack 'foo'"):
        parse_attack("sgm+foo", "linf", 0.1)
    with pytest.raises(RobustlabError, match="more than one base"):
        parse_attack("pgd+fgsm", "linf", 0.1)
    with pytest.raises(RobustlabError, match="twice"):
        parse_attack("mi+mi", "linf", 0.1)
    with pytest.raises(RobustlabError, match="norm"):
        parse_attack("pgd", "l3", 0.1)
    with pytest.raises(RobustlabError, match="gamma"):
        parse_attack("sgm", "linf", 0.1, gamma=0.0)


def test_default_gamma_follows_the_architecture() -> None:
    assert default_gamma(_untrained("resnet8", 0)) == 0.2
    assert default_gamma(_untrained("preact_resnet8", 0)) == 0.2
    assert default_gamma(_untrained("densenet", 0)) == 0.5
    assert default_gamma(_untrained("vit", 0)) == 0.6
    assert default_gamma(_untrained("resnet8", 0), one_step=True) == 0.5
    assert default_gamma(_untrained("densenet", 0), one_step=True) == 0.7
    assert parse_attack("fgsm+sgm", "linf", 0.1).gamma_for(_untrained("resnet8", 0)) == 0.5


def test_bad_matrices(digits: DataSplits) -> None:
    mlp = _untrained("mlp", 0)
    pgd = [parse_attack("pgd", "linf", 0.1, steps=1)]
    big = build_model("mlp", image_size=16)
    with pytest.raises(RobustlabError, match="target 'big' does not accept inputs of shape"):
        transfer_matrix({"m": mlp}, {"big": big}, pgd, digits.test, n=5)
    with pytest.raises(RobustlabError, match="attack 'sgm' on source 'm'.*residual blocks"):
        transfer_matrix(
            {"m": mlp}, {"m": mlp}, [parse_attack("sgm", "linf", 0.1)], digits.test, n=5
        )
    with pytest.raises(RobustlabError, match="n must be"):
        transfer_matrix({"m": mlp}, {"m": mlp}, pgd, digits.test, n=100_000)
    mixed = pgd + [parse_attack("pgd", "linf", 0.2)]
    with pytest.raises(RobustlabError, match="share the threat model"):
        transfer_matrix({"m": mlp}, {"m": mlp}, mixed, digits.test, n=5)
    with pytest.raises(RobustlabError, match="at least one"):
        transfer_matrix({}, {"m": mlp}, pgd, digits.test, n=5)


def _scaled_identity(dim: int, scale: float) -> nn.Linear:
    """A bias-free linear layer computing ``scale * x``."""
    layer = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        layer.weight.copy_(scale * torch.eye(dim))
    return layer


def _two_blocks(a: float, b: float) -> nn.Module:
    """x -> (1 + a) x -> (1 + b)(1 + a) x -> random linear head: hand-derivable gradients."""
    torch.manual_seed(0)
    return nn.Sequential(
        ResidualBlock(_scaled_identity(6, a)),
        ResidualBlock(_scaled_identity(6, b)),
        nn.Linear(6, 3),
    ).eval()


def test_skip_branch_split_on_hand_derived_blocks() -> None:
    a, b = 0.5, -3.0
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    rows = skip_branch_split(_two_blocks(a, b), x, y)
    # branch gradient = scale * skip gradient: share 1 / (1 + |scale|), cosine = sign(scale)
    for row, scale in zip(rows, (a, b), strict=True):
        assert math.isclose(row["skip_share"], 1 / (1 + abs(scale)), rel_tol=1e-5)
        assert math.isclose(row["branch_over_skip"], abs(scale), rel_tol=1e-5)
        assert math.isclose(row["cosine"], math.copysign(1, scale), rel_tol=1e-5)
    # a dense layer: the skip part is the gradient of the copied features, the branch the new ones
    torch.manual_seed(1)
    dense = nn.Sequential(DenseLayer(_scaled_identity(6, 2.0)), nn.Linear(12, 3)).eval()
    (row,) = skip_branch_split(dense, x, y)
    head = dense[1]
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        w = head.weight
        u = torch.softmax(dense(x), 1) - nn.functional.one_hot(y, 3)  # d CE / d logits
        g_skip, g_branch = u @ w[:, :6], 2.0 * (u @ w[:, 6:])
    share = g_skip.norm(dim=1) / (g_skip.norm(dim=1) + g_branch.norm(dim=1))
    assert math.isclose(row["skip_share"], float(share.median()), rel_tol=1e-4)
    with pytest.raises(RobustlabError, match="residual blocks"):
        skip_branch_split(nn.Sequential(nn.Linear(6, 3)), x, y)


def test_gradient_alignment_follows_sgm_on_hand_derived_blocks() -> None:
    a, b = 0.5, 2.0
    model = _two_blocks(a, b)
    other = _two_blocks(-0.9, 0.1)
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    rows = gradient_alignment(model, {"self": model, "other": other}, x, y, [0.2, 1.0])
    by = {(r["gamma"], r["target"]): r for r in rows}
    plain = by[(1.0, "self")]
    assert math.isclose(plain["cosine"], 1, rel_tol=1e-5) and plain["sign_gain"] == pytest.approx(1)
    assert plain["norm_ratio"] == pytest.approx(1) and plain["cos_plain"] == pytest.approx(1)
    # SGM on x -> (1 + g a)(1 + g b) x: the same direction, a shorter gradient
    sgm = by[(0.2, "self")]
    want = (1 + 0.2 * a) * (1 + 0.2 * b) / ((1 + a) * (1 + b))
    assert sgm["norm_ratio"] == pytest.approx(want, rel=1e-5)
    assert sgm["cos_plain"] == pytest.approx(1, abs=1e-5)
    assert sgm["cosine"] == pytest.approx(1, abs=1e-5)
    assert by[(0.2, "other")]["cosine"] == pytest.approx(by[(1.0, "other")]["cosine"], abs=1e-5)
    assert all(r["n"] == 30 for r in rows)


def test_both_engines_give_the_same_matrix_and_each_model_names_its_engine(
    digits: DataSplits,
) -> None:
    sources = {"s": _untrained("mlp", 1)}
    targets = {"t1": _untrained("mlp", 2), "t2": _untrained("mlp", 3)}
    attack = [TransferAttack("shift", Counting())]
    runs = {
        engine: transfer_matrix(sources, targets, attack, digits.test, n=60, engine=engine)
        for engine in ("torch", "onnxruntime")
    }
    a, b = runs["torch"], runs["onnxruntime"]
    assert [c.to_dict() for c in a.cells] == [c.to_dict() for c in b.cells]
    assert {n: e["engine"] for n, e in a.engines.items()} == dict.fromkeys(
        ("s", "t1", "t2"), "torch"
    )
    assert {n: e["engine"] for n, e in b.engines.items()} == dict.fromkeys(
        ("s", "t1", "t2"), "onnxruntime"
    )


def test_each_batch_is_seeded_by_its_start(
    digits: DataSplits, trained: dict[str, nn.Module]
) -> None:
    """The same 20 points twice, in two batches: DI's draws come from the attack's seed +
    the batch's start, so the second batch's examples are not the first's, and every
    sample's hit equals crafting its batch alone with that seed (which any process can)."""
    x, y = digits.test.x[:20], digits.test.y[:20]
    twice = Dataset(torch.cat([x, x]), torch.cat([y, y]), 10, "digits twice")
    source, target = trained["resnet8"], trained["mlp"]
    di = parse_attack("di", "linf", 0.2, steps=3, seed=7)
    result = transfer_matrix(
        {"r": source}, {"m": target}, [di], twice, batch_size=20, seed=7, engine="torch"
    )
    engine = di.attack
    assert isinstance(engine, IterativeAttack)
    expected = ""
    for start in (0, 20):
        alone = replace(di, attack=replace(engine, seed=7 + start))
        assert di.for_batch(start) == alone
        x_adv = alone.craft(source, x, y, None)
        with torch.no_grad():
            hits = target(x_adv).argmax(1) != y
        expected += "".join("1" if h else "0" for h in hits.tolist())
    assert expected[:20] != expected[20:]  # the seeds make a difference here
    assert result.cell("r", "m", "di").hits == expected
