"""Two-sample statistics of a batch against a reference window, their permutation p-values,
and the Westfall-Young min-P correction across statistics.

Every statistic is computed at once for many assignments of the pooled points (reference
window then batch) to the two groups: row 0 is the observed assignment, rows 1..P random
ones (the same P for every statistic). Inputs are the units: a per-input value (a summary,
a histogram, a feature vector) is exchangeable between the groups when the batch comes from
the reference's distribution, so each p-value ``#{rows >= observed} / (P + 1)`` is a valid
(exact, Monte Carlo) permutation p-value. The correction across statistics takes, per row,
the smallest p-value over the statistics and compares the observed one with that null
distribution (Westfall & Young 1993, single-step min-P): the probability that a batch from
the reference's distribution raises any alarm is then at most alpha, and with ties broken at
random (``min_p_adjusted(..., gen)``) alpha itself up to the grid 1/(1 + P), not the loose
bound of Bonferroni, which ignores that the statistics are correlated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The tests a statistic can use (what records call them).
TESTS = {
    "ks": "Kolmogorov-Smirnov distance of a per-input value",
    "ks-max": "largest per-dimension Kolmogorov-Smirnov distance of per-input vectors",
    "chi2-mean": "chi-square distance between the mean per-input histograms",
    "chi2-counts": "chi-square statistic of homogeneity of the class counts",
    "mmd": "squared MMD, Gaussian kernel with the reference's median-distance bandwidth",
}


def assignments(n_ref: int, m: int, permutations: int, gen: torch.Generator) -> torch.Tensor:
    """Group memberships (1 + P, n_ref + m) as floats, 1 for the batch: row 0 the observed
    (the last m points), then P uniformly random choices of m points of the pool."""
    total = n_ref + m
    member = torch.zeros(1 + permutations, total, dtype=torch.float64)
    member[0, n_ref:] = 1.0
    picks = torch.rand(permutations, total, generator=gen).argsort(dim=1)[:, :m]
    member[1:].scatter_(1, picks, 1.0)
    return member


def ks_distance(values: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """The KS distance between the two groups of a per-input value (N,), per assignment."""
    order = values.argsort()
    v = values[order].to(torch.float64)
    b = member[:, order]
    m = b[0].sum()
    n = b.shape[1] - m
    gap = (b.cumsum(1) / m - (1.0 - b).cumsum(1) / n).abs()
    last_of_tie = torch.ones_like(v, dtype=torch.bool)  # the ECDFs are compared between values
    last_of_tie[:-1] = v[1:] != v[:-1]
    return (gap * last_of_tie).amax(dim=1)


def ks_max(values: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """The largest per-dimension KS distance of per-input vectors (N, d), per assignment; its
    permutation p-value accounts for the d dimensions (and their correlation) exactly."""
    flat = values.reshape(values.shape[0], -1)
    best = torch.zeros(member.shape[0], dtype=torch.float64)
    for k in range(flat.shape[1]):
        best = torch.maximum(best, ks_distance(flat[:, k], member))
    return best


def chi2_mean(hist: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """The chi-square distance sum (a - b)^2 / (a + b) between the groups' mean per-input
    histograms (N, bins), per assignment."""
    h = hist.to(torch.float64)
    m = member[0].sum()
    n = member.shape[1] - m
    a = member @ h / m
    b = (1.0 - member) @ h / n
    total = a + b
    return ((a - b) ** 2 / total.clamp_min(1e-12)).sum(dim=1)


def chi2_counts(labels: torch.Tensor, classes: int, member: torch.Tensor) -> torch.Tensor:
    """Pearson's chi-square statistic of homogeneity of the 2 x classes table of counts,
    per assignment (classes no point falls in are left out)."""
    onehot = torch.nn.functional.one_hot(labels.long(), classes).to(torch.float64)
    total = onehot.sum(0)
    keep = total > 0
    m = member[0].sum()
    n = member.shape[1] - m
    in_batch = (member @ onehot)[:, keep]
    in_ref = total[keep] - in_batch
    share = total[keep] / (n + m)
    exp_b, exp_r = m * share, n * share
    return ((in_batch - exp_b) ** 2 / exp_b + (in_ref - exp_r) ** 2 / exp_r).sum(dim=1)


def median_bandwidth(ref: torch.Tensor) -> float:
    """The median pairwise Euclidean distance between reference vectors (1 if all coincide)."""
    x = ref.reshape(ref.shape[0], -1).to(torch.float64)
    d = torch.cdist(x, x)
    upper = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    med = float(upper.median()) if upper.numel() else 0.0
    return med if med > 0 else 1.0


def mmd2(values: torch.Tensor, member: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """The (biased, V-statistic) squared MMD between the groups with a Gaussian kernel
    exp(-|x - y|^2 / (2 h^2)), per assignment."""
    x = values.reshape(values.shape[0], -1).to(torch.float64)
    kernel = torch.exp(-torch.cdist(x, x).pow(2) / (2.0 * bandwidth**2))
    m = member[0].sum()
    n = member.shape[1] - m
    kb = member @ kernel  # (rows, N): each point's kernel sum over the batch
    kr = kernel.sum(0) - kb  # ... over the reference
    rest = 1.0 - member
    return (
        (kb * member).sum(1) / m**2 + (kr * rest).sum(1) / n**2 - 2.0 * (kb * rest).sum(1) / (m * n)
    )


@dataclass(frozen=True)
class Tested:
    """The observed statistics, their raw permutation p-values, and the adjusted ones."""

    values: torch.Tensor  # (k,)
    p_values: torch.Tensor  # (k,)
    adjusted: torch.Tensor  # (k,)


def _tail_shares(values: torch.Tensor, tiebreak: torch.Tensor | None) -> torch.Tensor:
    """Per row, the share of rows at least as extreme (values >= its own); with ``tiebreak``
    (one uniform number per row) tied rows are ordered by it, so the shares are exactly
    1/R, 2/R, ..., 1 (a randomised test, of exact size), else ties count as extreme."""
    rows = values.shape[0]
    if tiebreak is None:
        below = torch.searchsorted(values.sort().values, values.contiguous(), right=False)
        return (rows - below).to(torch.float64) / rows
    by_tiebreak = tiebreak.argsort()
    order = by_tiebreak[values[by_tiebreak].argsort(stable=True)]  # ascending (value, tiebreak)
    rank = torch.empty(rows, dtype=torch.float64)
    rank[order] = torch.arange(rows, dtype=torch.float64)
    return (rows - rank) / rows


def min_p_adjusted(table: torch.Tensor, gen: torch.Generator | None = None) -> Tested:
    """Raw and Westfall-Young min-P adjusted p-values from a (1 + P, k) table of statistics
    (row 0 observed, larger is more extreme): ``p[r, j]`` is the share of rows whose statistic
    j is at least row r's, and ``adjusted[j]`` the share of rows whose smallest p-value is at
    most ``p[0, j]``, so that P(any adjusted p <= alpha) <= alpha under exchangeability.

    With ``gen``, ties (discrete statistics: KS distances, class counts) are broken at random,
    one uniform number per row and statistic, and between the rows' smallest p-values: the
    rate of any alarm is then alpha itself (up to the grid 1/(1 + P)), not less."""
    rows, k = table.shape
    draw = (lambda: torch.rand(rows, generator=gen, dtype=torch.float64)) if gen else None
    p = torch.stack([_tail_shares(table[:, j], draw() if draw else None) for j in range(k)], 1)
    min_p = p.amin(dim=1)
    if draw is None:
        adjusted = (min_p[:, None] <= p[0][None, :]).sum(dim=0).to(torch.float64) / rows
    else:
        u = draw()
        below = min_p[:, None] < p[0][None, :]
        tied = (min_p[:, None] == p[0][None, :]) & (u[:, None] <= u[0])
        adjusted = (below | tied).sum(dim=0).to(torch.float64) / rows
    return Tested(table[0].to(torch.float64), p[0], adjusted)
