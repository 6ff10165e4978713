"""Local gains: per point, the operator norms of the logits' Jacobian, in chunks or at once."""

from __future__ import annotations

import pytest
import torch

from robustlab.models import build_model, gains
from robustlab.models.gains import input_jacobian, local_gains


def test_gains_in_chunks_match_each_point_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(4)
    model = build_model("resnet8", 1, 10, 8, width=4).double().eval()
    x = torch.rand(7, 1, 8, 8, dtype=torch.float64)
    monkeypatch.setattr(gains, "CHUNK", 3)  # chunks of 3, 3 and 1 points
    got = local_gains(model, x)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(  # type: ignore[no-untyped-call]
            lambda v: model(v.unsqueeze(0))[0], x[i]
        ).reshape(10, -1)
        assert float(got["linf"][i]) == pytest.approx(float(jac.abs().sum(1).max()), rel=1e-9)
        assert float(got["l2"][i]) == pytest.approx(float(torch.linalg.svdvals(jac)[0]), rel=1e-9)
    assert input_jacobian(model, x).shape == (7, 10, 64)
