"""Adversarial-input detectors on a small resnet trained on digits with a held-out split:
what they separate, their thresholds, their artifact, the adaptive attack, the bad inputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter as scipy_median
from torch import nn

from robustlab.attacks.registry import make_attack
from robustlab.data import DataSplits, load_data
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.structure import declare_features
from robustlab.monitor.detectors import layer_features, layer_names, lid_estimate, median_filter
from robustlab.monitor.detectors_eval import (
    AttackSpec,
    WithDetector,
    adaptive_attack,
    adaptive_targets,
    auroc,
    detection_metrics,
    evaluate_detectors,
)
from robustlab.monitor.detectors_suite import (
    JSON_FILE,
    TENSOR_FILE,
    DetectorSuite,
    fit_suite,
)
from robustlab.train import TrainConfig, train


@pytest.fixture(scope="module")
def held() -> DataSplits:
    """digits with 500 training samples held out of training."""
    return load_data("digits", calibration=500)


@pytest.fixture(scope="module")
def net(held: DataSplits, tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """A width-8 resnet8 trained 4 epochs on the rest of digits' training split."""
    cfg = TrainConfig(arch="resnet8", data="digits", epochs=4, arch_options={"width": 8})
    out = tmp_path_factory.mktemp("detect-net")
    return train(cfg, out, splits=held, progress=False).model.eval()


@pytest.fixture(scope="module")
def suite(net: nn.Module, held: DataSplits) -> DetectorSuite:
    """Every detector fitted on the held-out split."""
    assert held.calibration is not None
    return fit_suite(net, held.calibration.x, held.calibration.y, 10)


def test_mahalanobis_flags_inputs_far_from_the_data_and_passes_clean_ones(
    net: nn.Module, held: DataSplits
) -> None:
    assert held.calibration is not None
    only = fit_suite(net, held.calibration.x, held.calibration.y, 10, names=["mahalanobis"])
    clean = held.test.x[:200]
    far = torch.rand(200, *clean.shape[1:], generator=torch.Generator().manual_seed(1))
    s_clean = only.score(net, clean)["mahalanobis"]
    s_far = only.score(net, far)["mahalanobis"]
    separation = auroc(s_clean, s_far)
    assert separation is not None and separation > 0.95
    flags_far = only.flags({"mahalanobis": s_far})["mahalanobis"]
    flags_clean = only.flags({"mahalanobis": s_clean})["mahalanobis"]
    assert float(flags_far.double().mean()) > 0.9
    assert float(flags_clean.double().mean()) < 0.15


def test_thresholds_flag_about_5_percent_of_unseen_clean_inputs(
    suite: DetectorSuite, net: nn.Module, held: DataSplits
) -> None:
    """The thresholds come from held-out inputs the detectors were not fitted on; on the test
    split (359 inputs, never seen) each flags close to 5 % (binomial std ~1.2 points)."""
    assert set(suite.detectors) == {"mahalanobis", "lid", "squeeze", "margin"}
    assert all(
        v == pytest.approx(0.05, abs=0.006)
        for v in suite.info["fit"]["fpr_threshold_split"].values()
    )
    flags = suite.flags(suite.score(net, held.test.x))
    for name, f in flags.items():
        assert float(f.double().mean()) <= 0.1, name


def test_the_artifact_round_trips_bit_exactly_as_safetensors_and_json(
    suite: DetectorSuite, net: nn.Module, held: DataSplits, tmp_path: Path
) -> None:
    suite.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([JSON_FILE, TENSOR_FILE])
    raw = (tmp_path / "a" / TENSOR_FILE).read_bytes()
    header = int.from_bytes(raw[:8], "little")  # safetensors: header length, then JSON
    json.loads(raw[8 : 8 + header])
    meta = json.loads((tmp_path / "a" / JSON_FILE).read_text())
    assert meta["model_fingerprint"] == suite.fingerprint
    back = DetectorSuite.load(tmp_path / "a")
    back.save(tmp_path / "b")
    assert (tmp_path / "b" / TENSOR_FILE).read_bytes() == raw
    assert back.thresholds == suite.thresholds and back.scales == suite.scales
    x = held.test.x[:50]
    first, again = suite.score(net, x), back.score(net, x)
    for name in first:
        assert torch.equal(first[name], again[name]), name


def test_a_changed_artifact_or_another_folder_is_refused(
    suite: DetectorSuite, tmp_path: Path
) -> None:
    with pytest.raises(RobustlabError, match="is not a detector artifact"):
        DetectorSuite.load(tmp_path)
    suite.save(tmp_path)
    raw = bytearray((tmp_path / TENSOR_FILE).read_bytes())
    raw[-1] ^= 1
    (tmp_path / TENSOR_FILE).write_bytes(bytes(raw))
    with pytest.raises(RobustlabError, match="does not match its manifest"):
        DetectorSuite.load(tmp_path)


def test_scoring_with_another_model_is_refused_in_one_sentence(
    suite: DetectorSuite, net: nn.Module, held: DataSplits
) -> None:
    other = copy.deepcopy(net)
    with torch.no_grad():
        next(other.parameters()).mul_(1.01)
    with pytest.raises(RobustlabError, match="was fitted on .* cannot score") as exc:
        suite.check_model(other)
    assert str(exc.value).count(". ") == 0
    suite.check_model(copy.deepcopy(net))  # the same weights: accepted


def test_inputs_of_another_shape_are_refused(suite: DetectorSuite, net: nn.Module) -> None:
    with pytest.raises(
        RobustlabError, match="takes 1x8x8 inputs but was given inputs of shape 1x28x28"
    ):
        suite.score(net, torch.zeros(2, 1, 28, 28))


def test_too_few_samples_for_the_feature_dimension_says_how_many(
    net: nn.Module, held: DataSplits
) -> None:
    assert held.calibration is not None
    x, y = held.calibration.x[:40], held.calibration.y[:40]
    # width-8 resnet8: its widest layer has 32 features; 32 + 10 classes + 1 = 43 to fit, 60 %
    with pytest.raises(
        RobustlabError, match=r"Mahalanobis needs at least 43 .* at least 72 are needed"
    ):
        fit_suite(net, x, y, 10, names=["mahalanobis"])


def test_median_filter_matches_scipy_for_the_2x2_window() -> None:
    x = torch.rand(3, 2, 9, 7, generator=torch.Generator().manual_seed(0))
    want = scipy_median(x.numpy(), size=(1, 1, 2, 2))
    assert np.allclose(median_filter(x, 2).numpy(), want)


def test_lid_of_points_on_a_plane_is_about_two() -> None:
    g = torch.Generator().manual_seed(0)
    plane = torch.zeros(2000, 10)
    plane[:, :2] = torch.rand(2000, 2, generator=g)
    queries = plane[:50].clone()
    queries[:, :2] = 0.25 + 0.5 * queries[:, :2]  # inside the plane, away from its edges
    est = lid_estimate(queries, plane[50:], k=20)
    assert float(est.median()) == pytest.approx(2.0, abs=0.5)


def test_system_robust_accuracy_counts_correct_or_flagged_inputs() -> None:
    y = torch.tensor([0, 1, 2, 3, 4])
    clean_pred = torch.tensor([0, 1, 2, 3, 0])  # point 4 wrong already
    adv_pred = torch.tensor([0, 2, 2, 0, 0])  # 1 and 3 broken by the attack
    adv_scores = torch.tensor([0.0, 5.0, 0.0, 0.5, 2.0])  # threshold 1: flags 1 and 4
    clean_scores = torch.tensor([0.2, 0.4, 0.6, 0.8, 9.0])
    m = detection_metrics(clean_scores, clean_pred, adv_scores, adv_pred, y, threshold=1.0)
    assert m["system_robust_accuracy"] == pytest.approx(4 / 5)  # 0, 1 (flag), 2, 4 (flag)
    assert m["robust_accuracy"] == pytest.approx(2 / 5)  # 0 and 2
    assert m["successful"] == 2 and m["tpr_at_threshold"] == pytest.approx(1 / 2)
    # successful examples score 5.0 and 0.5 against clean 0.2, 0.4, 0.6, 0.8 (point 4 excluded)
    assert m["auroc"] == pytest.approx((4 + 2) / 8)


def test_the_extended_classifier_predicts_the_extra_class_exactly_when_flagged(
    suite: DetectorSuite, net: nn.Module, held: DataSplits
) -> None:
    x = torch.cat([held.test.x[:40], torch.rand(20, 1, 8, 8)])  # some flagged, some not
    for name, det in suite.detectors.items():
        joint = WithDetector(net, det, suite.thresholds[name], suite.scales[name]).eval()
        with torch.no_grad():
            g, z = joint(x), net(x)
        flagged = suite.flags(suite.score(net, x))[name]
        assert 0 < int(flagged.sum()) < len(x), name
        assert torch.equal(g.argmax(1) == 10, flagged), name
        assert torch.equal(g[:, :10], z), name
        assert torch.equal(g.argmax(1)[~flagged], z.argmax(1)[~flagged]), name


def test_the_adaptive_target_is_the_class_the_plain_attack_reached_else_the_runner_up(
    net: nn.Module, held: DataSplits
) -> None:
    x, y = held.test.x[:6], held.test.y[:6]
    with torch.no_grad():
        z = net(x)
    runner_up = z.scatter(1, y[:, None], float("-inf")).argmax(1)
    reached = (y + 3) % 10
    base = torch.where(torch.arange(6) % 2 == 0, reached, y)  # even points broken
    targets = adaptive_targets(net, x, y, base)
    assert torch.equal(targets[::2], reached[::2])
    assert torch.equal(targets[1::2], runner_up[1::2])
    assert bool((targets != y).all())


def test_the_adaptive_attack_lowers_the_detection_rate_on_the_same_points(
    suite: DetectorSuite, net: nn.Module, held: DataSplits
) -> None:
    """Same points, same budget: PGD that ignores the detector is caught by Mahalanobis (on
    this digits net ~85 % of its successful examples); the joint attack evades it (an
    adaptive attack ignoring the detector would be caught as often)."""
    small = DetectorSuite(
        suite.fingerprint,
        suite.input_shape,
        suite.num_classes,
        {"mahalanobis": suite.detectors["mahalanobis"]},
        suite.thresholds,
        suite.scales,
        suite.info,
    )
    x, y = held.test.x[:60], held.test.y[:60]
    pgd = AttackSpec("pgd", make_attack("pgd", "linf", 0.3, steps=20))
    rec = evaluate_detectors(net, small, x, y, [pgd], adaptive=adaptive_attack("linf", 0.3, 40, 0))
    both = rec["side_by_side"]["mahalanobis"]
    plain, adaptive = both["non_adaptive"], both["adaptive"]
    worst = both["system_robust_accuracy_all_attacks"]
    assert worst <= min(plain["system_robust_accuracy"], adaptive["system_robust_accuracy"])
    assert plain["attack"] == "pgd" and adaptive["attack"] == "adaptive"
    assert plain["tpr_at_threshold"] > 0.7
    assert adaptive["tpr_at_threshold"] < plain["tpr_at_threshold"] - 0.4
    assert adaptive["system_robust_accuracy"] < plain["system_robust_accuracy"] - 0.3
    assert rec["adaptive"]["attack"]["steps"] == 40


class _Plain(nn.Module):
    """A model that declares no units, only its classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU())
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        out: torch.Tensor = self.fc(self.body(x))
        return out


def test_a_model_without_units_gives_its_penultimate_features(held: DataSplits) -> None:
    undo = declare_features(_Plain, "fc")
    try:
        model = _Plain().eval()
        assert layer_names(model) == ["penultimate"]
        feats, logits = layer_features(model, held.test.x[:5])
        assert [tuple(f.shape) for f in feats] == [(5, 12)]
        assert torch.equal(logits, model(held.test.x[:5]))
        vit = build_model("vit", in_channels=1, image_size=8, num_classes=10).eval()
        assert all(f.dim() == 2 for f in layer_features(vit, held.test.x[:5])[0])  # tokens averaged
    finally:
        undo()


def test_mahalanobis_with_the_input_step_scores_and_passes_a_gradient(
    net: nn.Module, held: DataSplits
) -> None:
    assert held.calibration is not None
    cal = held.calibration
    plain = fit_suite(net, cal.x, cal.y, 10, names=["mahalanobis"])
    stepped = fit_suite(net, cal.x, cal.y, 10, names=["mahalanobis"], noise=0.01)
    x = held.test.x[:20]
    a, b = plain.score(net, x)["mahalanobis"], stepped.score(net, x)["mahalanobis"]
    assert bool(torch.isfinite(b).all()) and not torch.equal(a, b)
    assert stepped.manifest()["detectors"]["mahalanobis"]["config"]["noise"] == 0.01
    probe = x.clone().requires_grad_(True)
    stepped.detectors["mahalanobis"].score(net, probe).sum().backward()
    assert probe.grad is not None and float(probe.grad.abs().sum()) > 0


def test_squeezing_takes_xu_et_als_bit_depth_for_grey_and_colour_inputs() -> None:
    """1 bit for grey-scale inputs (their MNIST setting), 5 bits for colour (CIFAR-10)."""
    torch.manual_seed(0)
    for channels, bits in ((1, 1), (3, 5)):
        model = build_model("mlp", channels, 10, 8).eval()
        x = torch.rand(60, channels, 8, 8)
        y = torch.randint(0, 10, (60,))
        suite = fit_suite(model, x, y, 10, names=("squeeze",))
        assert suite.detectors["squeeze"].config()["bit_depth"] == bits
