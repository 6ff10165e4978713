"""Weight compressibility metrics against numpy on the saved weights, closed forms, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file
from torch import nn

from robustlab.analysis.compressibility import (
    best_k,
    check_kappas,
    layer_metrics,
    matrix_metrics,
    near_zero_fraction,
    network_summary,
)
from robustlab.errors import RobustlabError
from robustlab.models.weights import best_k_error, k_for_error

KAPPAS = (0.1, 0.25, 0.5)


def _numpy_best_k_error(theta: np.ndarray, kappa: float) -> float:
    """The best-k relative error (q = 2) of a vector, k = ceil(kappa * len), in numpy."""
    mags = np.sort(np.abs(theta))[::-1]
    k = math.ceil(round(kappa * len(mags), 9))
    return float(np.sqrt((mags[k:] ** 2).sum()) / np.sqrt((mags**2).sum()))


def _close(a: float, b: float) -> bool:
    """Equal to 1e-4 relative (absolute 1e-9 near zero)."""
    return abs(a - b) <= 1e-4 * abs(b) + 1e-9


def test_metrics_agree_with_numpy_svd_of_the_saved_weights(
    digits_net: nn.Module, tmp_path: Path
) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in digits_net.state_dict().items()}, str(path))
    saved = load_file(str(path))
    metrics = layer_metrics(digits_net, KAPPAS)
    assert len(metrics) == 10  # resnet8: stem, 6 branch convs, 2 shortcut convs, the head
    for m in metrics:
        w = saved[f"{m.name}.weight"].astype(np.float64)
        assert list(w.shape) == m.shape
        w = w.reshape(w.shape[0], -1)
        s = np.linalg.svd(w, compute_uv=False)
        p = s / s.sum()
        entropy = float(-(p * np.log(p)).sum())
        frob = float(np.sqrt((w**2).sum()))
        expected = {
            "frobenius_norm": frob,
            "spectral_norm": float(s[0]),
            "stable_rank": frob**2 / float(s[0]) ** 2,
            "linf_operator_norm": float(np.abs(w).sum(axis=1).max()),
            "effective_rank_entropy": entropy,
            "effective_rank_exp": math.exp(entropy),
        }
        for key, value in expected.items():
            assert _close(getattr(m, key), value), (m.name, key)
        rows = np.sqrt((w**2).sum(axis=1))
        for kappa in KAPPAS:
            assert _close(m.neuron_compressibility[f"{kappa:g}"], _numpy_best_k_error(rows, kappa))
            assert _close(m.spectral_compressibility[f"{kappa:g}"], _numpy_best_k_error(s, kappa))


def test_rank_one_matrix() -> None:
    w = torch.outer(torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([2.0, 1.0, -1.0]))
    m = matrix_metrics("r1", "linear", w.shape, w, KAPPAS)
    assert m.stable_rank == pytest.approx(1.0, rel=1e-12)
    assert m.effective_rank_exp == pytest.approx(1.0, rel=1e-6)
    assert m.effective_rank_entropy == pytest.approx(0.0, abs=1e-6)
    assert all(v == pytest.approx(0.0, abs=1e-7) for v in m.spectral_compressibility.values())


def test_identity() -> None:
    n = 10
    m = matrix_metrics("eye", "linear", (n, n), torch.eye(n), KAPPAS)
    assert m.effective_rank_exp == pytest.approx(n, rel=1e-12)
    assert m.effective_rank_entropy == pytest.approx(math.log(n), rel=1e-12)
    assert m.stable_rank == pytest.approx(n, rel=1e-12)
    assert m.spectral_norm == pytest.approx(1.0) and m.linf_operator_norm == pytest.approx(1.0)
    for kappa in KAPPAS:  # every row norm and singular value is 1: error sqrt((n - k) / n)
        k = best_k(kappa, n)
        want = math.sqrt((n - k) / n)
        assert m.neuron_compressibility[f"{kappa:g}"] == pytest.approx(want, rel=1e-12)
        assert m.spectral_compressibility[f"{kappa:g}"] == pytest.approx(want, rel=1e-12)


def test_k_is_the_ceiling_of_kappa_times_length() -> None:
    assert [best_k(k, 10) for k in (0.1, 0.25, 0.3, 0.5, 0.99)] == [1, 3, 3, 5, 10]
    assert best_k(0.01, 3) == 1


def test_zero_matrix_counts_as_perfectly_compressible() -> None:
    m = matrix_metrics("z", "linear", (3, 4), torch.zeros(3, 4), KAPPAS)
    assert m.stable_rank == 0.0 and m.effective_rank_exp == 0.0
    assert set(m.neuron_compressibility.values()) == {0.0}
    assert m.near_zero_fraction == 1.0


def test_pruned_weights_count_as_near_zero() -> None:
    w = torch.randn(8, 8)
    w[:, :2] = 0.0
    assert near_zero_fraction(w) == pytest.approx(0.25)
    assert near_zero_fraction(torch.tensor([1.0, 1e-4, 2e-3])) == pytest.approx(1 / 3)


def test_layer_names_are_the_state_dict_names_and_conv_rows_are_filters() -> None:
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4, 2))
    metrics = layer_metrics(net)
    assert [m.name for m in metrics] == ["0", "3"]
    assert metrics[0].matrix_shape == [5, 27] and metrics[0].kind == "conv"
    assert {f"{m.name}.weight" for m in metrics} <= set(net.state_dict())


def test_network_summary_is_the_mean_over_layers(digits_net: nn.Module) -> None:
    metrics = layer_metrics(digits_net)
    summary = network_summary(metrics)
    assert summary["layers"] == len(metrics)
    assert summary["stable_rank"] == pytest.approx(np.mean([m.stable_rank for m in metrics]))
    want = np.mean([m.spectral_compressibility["0.25"] for m in metrics])
    assert summary["spectral_compressibility"]["0.25"] == pytest.approx(want)


def test_a_model_without_conv_or_linear_layers_is_refused() -> None:
    with pytest.raises(RobustlabError, match="has no conv or linear layer"):
        layer_metrics(nn.Sequential(nn.Flatten(), nn.ReLU()))


@pytest.mark.parametrize("kappa", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_kappa_outside_zero_one_is_refused(kappa: float) -> None:
    with pytest.raises(RobustlabError, match="strictly between 0 and 1"):
        check_kappas([0.1, kappa])


def test_k_for_error_is_the_smallest_k_reaching_the_target() -> None:
    torch.manual_seed(0)
    theta = torch.randn(50)
    for target in (0.0, 0.05, 0.3, 0.7, 0.95):
        k = k_for_error(theta, target)
        assert best_k_error(theta, k) <= target + 1e-12
        if k > 0:
            assert best_k_error(theta, k - 1) > target
    assert k_for_error(torch.tensor([3.0, 4.0]), 0.8) == 1  # tail 3/5 = 0.6
    assert k_for_error(torch.zeros(4), 0.1) == 0
    with pytest.raises(RobustlabError, match=r"target error must be in \[0, 1\)"):
        k_for_error(theta, 1.0)
