"""Success criteria and the per-sample order of points: every constructor decides as documented."""

from __future__ import annotations

import torch

from robustlab.core.criteria import Standing, slowest, smallest, strongest, success, unbroken

INF = float("inf")


def test_success_is_misclassification_or_reaching_the_target() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
    y = torch.tensor([0, 0, 2])
    assert success(logits, y, None).tolist() == [False, True, False]
    assert success(logits, y, torch.tensor([1, 1, 1])).tolist() == [False, True, False]


def test_strongest_prefers_success_then_the_larger_loss_and_a_success_is_final() -> None:
    kept = strongest(torch.tensor([False, False, True, True]), torch.tensor([1.0, 1.0, 5.0, 5.0]))
    new = strongest(torch.tensor([False, True, True, False]), torch.tensor([2.0, -9.0, 9.0, 9.0]))
    assert new.beats(kept).tolist() == [True, True, False, False]
    assert kept.beats(new).tolist() == [False, False, False, True]


def test_a_success_beats_a_failure_even_at_an_infinite_loss() -> None:
    kept = strongest(torch.tensor([False]), torch.tensor([INF]))
    assert strongest(torch.tensor([True]), torch.tensor([0.0])).beats(kept).tolist() == [True]


def test_an_equal_or_nan_loss_never_replaces_the_kept_point() -> None:
    kept = strongest(torch.tensor([False, False]), torch.tensor([1.0, 1.0]))
    new = strongest(torch.tensor([False, False]), torch.tensor([1.0, float("nan")]))
    assert new.beats(kept).tolist() == [False, False]


def test_unbroken_inputs_lose_to_any_failure_unless_already_successful() -> None:
    clean = unbroken(torch.tensor([False, True]))
    new = strongest(torch.tensor([False, False]), torch.tensor([-1e30, 1e30]))
    assert new.beats(clean).tolist() == [True, False]


def test_smallest_keeps_only_adversarial_points_and_prefers_the_smaller_norm() -> None:
    kept = smallest(
        torch.tensor([False, True, True, False]), torch.tensor([INF, 0.5, 0.5, INF]), 1.0
    )
    new = smallest(
        torch.tensor([False, True, False, True]), torch.tensor([0.1, 0.4, 0.1, 2.0]), 1.0
    )
    assert new.beats(kept).tolist() == [False, True, False, True]
    assert kept.hit.tolist() == [False, True, True, False]
    assert new.hit.tolist() == [False, True, False, False]  # 2.0 is adversarial, outside eps


def test_slowest_prefers_a_later_exit_then_a_lower_objective_also_after_success() -> None:
    kept = slowest(torch.tensor([1, 1, 3, 3, 2]), 3, torch.tensor([0.5, 0.5, 0.5, 0.5, 0.1]))
    new = slowest(torch.tensor([2, 1, 3, 3, 1]), 3, torch.tensor([9.0, 0.4, 0.4, 0.6, 0.0]))
    assert kept.hit.tolist() == [False, False, True, True, False]
    assert new.beats(kept).tolist() == [True, True, True, False, False]


def test_put_and_indexing_move_whole_standings() -> None:
    kept = strongest(torch.tensor([False, False, False]), torch.tensor([1.0, 2.0, 3.0]))
    new = strongest(torch.tensor([True, False]), torch.tensor([0.0, 7.0]))
    kept.put(torch.tensor([2, 0]), new, torch.tensor([True, True]))
    assert kept.hit.tolist() == [False, False, True]
    assert kept.keys[0].tolist() == [7.0, 2.0, INF]
    part = kept[torch.tensor([2])]
    assert isinstance(part, Standing) and part.hit.tolist() == [True]
