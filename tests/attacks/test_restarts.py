"""The restart / best-keeping wrapper: only unsuccessful samples are retried, the best is kept."""

from __future__ import annotations

import torch

from robustlab.attacks.restarts import Best, Candidates, run_restarts
from robustlab.core.criteria import strongest, unbroken


def test_offer_keeps_per_sample_the_stronger_point_at_the_given_rows() -> None:
    x = torch.zeros(4, 2)
    best = Best(x, unbroken(torch.tensor([False, True, False, False])))
    first = best.offer(
        torch.ones(2, 2),
        strongest(torch.tensor([False, False]), torch.tensor([1.0, 1.0])),
        torch.tensor([0, 2]),
    )
    assert first.tolist() == [True, True]
    again = best.offer(
        torch.full((3, 2), 2.0),
        strongest(torch.tensor([False, True, False]), torch.tensor([0.5, 0.0, 3.0])),
        torch.tensor([0, 2, 3]),
    )
    assert again.tolist() == [False, True, True]
    assert best.x[:, 0].tolist() == [1.0, 0.0, 2.0, 2.0]
    assert best.done.tolist() == [False, True, True, False]
    assert best.todo().tolist() == [0, 3]
    assert torch.equal(x, torch.zeros(4, 2))  # the caller's tensor is not written


def test_offer_without_rows_covers_the_whole_batch() -> None:
    best = Best(torch.zeros(2, 1), unbroken(torch.tensor([False, False])))
    best.offer(torch.ones(2, 1), strongest(torch.tensor([True, False]), torch.tensor([0.0, -1.0])))
    assert best.x[:, 0].tolist() == [1.0, 1.0] and best.done.tolist() == [True, False]


def test_restarts_run_only_on_unsuccessful_samples_and_stop_when_none_is_left() -> None:
    seen: list[list[int]] = []

    def attempt(todo: torch.Tensor, r: int) -> Candidates:
        seen.append(todo.tolist())
        hit = todo == 2 * r + 1  # sample 1 succeeds in round 0, sample 3 in round 1
        loss = torch.full((len(todo),), float(r))
        yield torch.full((len(todo), 1), float(r + 1)), strongest(hit, loss)

    best = Best(torch.zeros(5, 1), unbroken(torch.tensor([True, False, False, False, False])))
    run_restarts(best, 4, attempt)
    assert seen == [[1, 2, 3, 4], [2, 3, 4], [2, 4], [2, 4]]
    # successes stay at their round; failures at the first round with the largest loss (the last)
    assert best.x[:, 0].tolist() == [0.0, 1.0, 4.0, 2.0, 4.0]

    calls: list[int] = []

    def always(todo: torch.Tensor, r: int) -> Candidates:
        calls.append(r)
        return [
            (
                torch.ones(len(todo), 1),
                strongest(torch.ones(len(todo), dtype=torch.bool), torch.zeros(len(todo))),
            )
        ]

    done = Best(torch.zeros(3, 1), unbroken(torch.zeros(3, dtype=torch.bool)))
    run_restarts(done, 5, always)
    assert calls == [0] and done.done.all()
