"""The two-sample statistics against their textbook definitions, and the min-P correction's
false-alarm rate on exchangeable tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from robustlab.monitor.drift_stats import (
    assignments,
    chi2_counts,
    ks_distance,
    ks_max,
    min_p_adjusted,
    mmd2,
)


def _member(n: int, m: int, permutations: int = 20) -> torch.Tensor:
    return assignments(n, m, permutations, torch.Generator().manual_seed(0))


def test_assignments_put_m_points_in_the_batch_and_the_observed_first() -> None:
    member = _member(30, 7)
    assert torch.equal(member[0], torch.tensor([0.0] * 30 + [1.0] * 7, dtype=torch.float64))
    assert torch.all(member.sum(1) == 7)


def test_ks_distance_is_scipys_two_sample_statistic_also_with_ties() -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(0, 6, (45,), generator=gen).double()  # many ties
    member = _member(30, 15)
    ours = ks_distance(values, member)
    for row in (0, 3, 11):
        batch = values[member[row] == 1].numpy()
        ref = values[member[row] == 0].numpy()
        assert float(ours[row]) == pytest.approx(stats.ks_2samp(batch, ref).statistic)


def test_ks_max_is_the_largest_per_dimension_distance() -> None:
    values = torch.randn(40, 3, generator=torch.Generator().manual_seed(2)).double()
    member = _member(25, 15)
    each = torch.stack([ks_distance(values[:, k], member) for k in range(3)])
    assert torch.allclose(ks_max(values, member), each.amax(0))


def test_chi2_counts_is_pearsons_homogeneity_statistic() -> None:
    labels = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(3))
    member = _member(40, 20)
    batch = np.bincount(labels[member[5] == 1].numpy(), minlength=4)
    ref = np.bincount(labels[member[5] == 0].numpy(), minlength=4)
    keep = (batch + ref) > 0
    expected = stats.chi2_contingency(np.stack([batch[keep], ref[keep]]), correction=False)[0]
    assert float(chi2_counts(labels, 4, member)[5]) == pytest.approx(expected)


def test_mmd2_is_the_biased_estimate_of_its_definition() -> None:
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(4)).double()
    member = _member(20, 10)
    h = 1.7

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * h * h))

    b, r = x[member[2] == 1], x[member[2] == 0]
    direct = k(b, b).mean() + k(r, r).mean() - 2 * k(b, r).mean()
    assert float(mmd2(x, member, h)[2]) == pytest.approx(float(direct))


def test_min_p_any_alarm_rate_is_alpha_on_exchangeable_tables_not_a_bonferroni_fraction() -> None:
    """Three perfectly correlated statistics: Bonferroni would alarm at alpha / 3; min-P at
    alpha. 3000 tables of 1 + 99 exchangeable rows, alpha = 0.1."""
    gen = torch.Generator().manual_seed(5)
    alpha, tables = 0.1, 3000
    alarms = 0
    for _ in range(tables):
        column = torch.randn(100, 1, generator=gen)
        table = torch.cat([column, column * 2, column + 1], dim=1)
        alarms += int(min_p_adjusted(table).adjusted.min() <= alpha)
    rate = alarms / tables
    assert abs(rate - alpha) < 3.5 * (alpha * (1 - alpha) / tables) ** 0.5


def test_adjusted_p_values_are_at_least_the_raw_ones() -> None:
    table = torch.randn(50, 4, generator=torch.Generator().manual_seed(6))
    table[0, 1] = 10.0  # the observed batch is extreme in one statistic
    tested = min_p_adjusted(table)
    assert tested.p_values[1] == pytest.approx(1 / 50)
    assert torch.all(tested.adjusted >= tested.p_values)


def test_random_tie_breaking_gives_discrete_statistics_the_stated_rate() -> None:
    """Two statistics with five values each (many ties): counting ties as extreme alarms at
    less than alpha; breaking them at random at alpha itself. 3000 tables, alpha = 0.1."""
    gen = torch.Generator().manual_seed(7)
    alpha, tables = 0.1, 3000
    exact = conservative = 0
    for _ in range(tables):
        table = torch.randint(0, 5, (100, 2), generator=gen).double()
        exact += int(min_p_adjusted(table, gen).adjusted.min() <= alpha)
        conservative += int(min_p_adjusted(table).adjusted.min() <= alpha)
    margin = 3.5 * (alpha * (1 - alpha) / tables) ** 0.5
    assert abs(exact / tables - alpha) < margin
    assert conservative / tables < alpha - margin
