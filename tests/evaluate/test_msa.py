"""MSA: surrogates find what a gradient-masked defence hides from plain AutoAttack; the
defended forward judges every example on the whole evaluation batch; only still-robust
points go on; a point is robust only if it survives every stage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks.autoattack import AutoAttack
from robustlab.cli import main
from robustlab.core.guard import frozen_eval
from robustlab.data import DataSplits, load_data
from robustlab.errors import RobustlabError
from robustlab.evaluate import evaluate
from robustlab.evaluate.msa import MSARecord, evaluate_msa, msa_batch, msa_stages
from robustlab.models.structure import declare_surrogates
from robustlab.store import ResultStore
from robustlab.train import TrainConfig, train


class HardDecision(nn.Module):
    """A toy defence: its base classifier's decision as confident one-hot logits. A hard
    step in the forward: its input gradient is zero everywhere, so gradient attacks on it
    cannot move, while the base classifier is a perfect differentiable surrogate."""

    def __init__(self, base: nn.Module) -> None:
        """Wrap ``base``."""
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot logits of the base's decision (``0 * z`` keeps autograd's graph)."""
        z: torch.Tensor = self.base(x)
        return 10.0 * F.one_hot(z.argmax(1), z.shape[1]).to(z.dtype) + 0 * z


class Recorder(nn.Module):
    """A model that records every batch it is called on."""

    def __init__(self, inner: nn.Module) -> None:
        """Wrap ``inner``."""
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The inner model's output; ``x`` is recorded."""
        self.seen.append(x.detach().clone())
        out: torch.Tensor = self.inner(x)
        return out


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module, DataSplits]:
    """Two MLPs trained on digits (a base and a weaker, different one) and the data."""
    splits = load_data("digits")
    made = []
    for width, epochs in ((64, 8), (16, 3)):
        cfg = TrainConfig(arch="mlp", data="digits", epochs=epochs, arch_options={"width": width})
        out = tmp_path_factory.mktemp(f"mlp{width}")
        made.append(train(cfg, out, splits=splits, progress=False).model.eval())
    return made[0], made[1], splits


def _robust(rec: MSARecord) -> set[int]:
    """Indices of the points a record calls robust."""
    return {int(str(r["index"])) for r in rec.samples if r["robust"]}


def _stage_of(row: dict[str, object]) -> str | None:
    """The stage that broke a point (None: robust or misclassified clean)."""
    by = row["broken_by"]
    return None if by is None else str(by).split("/")[0]


def test_plain_autoattack_is_fooled_by_a_masked_defence_and_msa_is_not(
    nets: tuple[nn.Module, nn.Module, DataSplits],
) -> None:
    base, _, splits = nets
    hard = HardDecision(base).eval()
    rec = evaluate_msa(
        hard, splits.test, [("base", base)], eps=0.1, n=20, batch_size=20, progress=False
    )
    # the defence decides as its base does: its true robustness is the base's
    ref = evaluate(base, splits.test, AutoAttack(eps=0.1), n=20, batch_size=20, progress=False)
    assert rec.clean_accuracy == ref.clean_accuracy
    assert rec.robust_accuracy <= rec.plain_robust_accuracy - 0.2  # the surrogate sees
    assert rec.robust_accuracy <= ref.robust_accuracy + 2 / 20
    assert any("overstates" in w for w in rec.warnings)
    assert any("all-zero input gradient" in w for w in rec.warnings)
    # the record: every stage, every member (Square only in the plain stage), the batch
    assert [s["stage"] for s in rec.stages] == ["plain", "base"]
    assert [p["attack"] for p in rec.per_attack] == [
        "plain/apgd-ce",
        "plain/apgd-t",
        "plain/fab-t",
        "plain/square",
        "base/apgd-ce",
        "base/apgd-t",
    ]
    assert rec.batch_size == 20 and rec.kind == "msa" and rec.n == 20
    assert rec.stages[0]["robust_accuracy_after"] == rec.plain_robust_accuracy
    assert rec.stages[-1]["robust_accuracy_after"] == rec.robust_accuracy
    assert sum(s["broken"] for s in rec.stages) == sum(
        r["broken_by"] is not None for r in rec.samples
    )
    d = rec.to_dict()
    assert "samples" not in d and d["attack"]["surrogates"] == ["base"]
    assert d["attack"]["surrogate_attacks"] == ["apgd-ce", "apgd-t"]  # FAB-T: asked for


def test_msa_is_the_per_sample_and_of_its_surrogates_and_passes_on_only_robust_points(
    nets: tuple[nn.Module, nn.Module, DataSplits],
) -> None:
    base, other, splits = nets
    hard = HardDecision(base).eval()
    # batch size 1: each point is attacked alone, so its outcome in a stage does not
    # depend on which other points reached that stage
    kw = {"eps": 0.1, "n": 20, "batch_size": 1, "attacks": ("apgd-ce",), "progress": False}
    kw["fold_batchnorm"] = False  # no private copy: the spy below is the module attacked
    one = evaluate_msa(hard, splits.test, [("base", base)], **kw)  # type: ignore[arg-type]
    two = evaluate_msa(hard, splits.test, [("other", other)], **kw)  # type: ignore[arg-type]
    spy = Recorder(other)
    both = evaluate_msa(hard, splits.test, [("base", base), ("other", spy)], **kw)  # type: ignore[arg-type]
    assert _robust(one) != _robust(two)  # the two surrogates break different points
    assert _robust(both) == _robust(one) & _robust(two)
    assert both.robust_accuracy <= min(one.robust_accuracy, two.robust_accuracy)
    # the second surrogate was given exactly the points still robust after the first
    # stages (an attack's first call is on its clean inputs: find them by exact match)
    x = splits.test.x[:20]
    attacked = {i for seen in spy.seen for row in seen for i in range(20) if torch.equal(row, x[i])}
    after_base = {
        int(str(r["index"]))
        for r in both.samples
        if r["clean_pred"] == r["label"] and _stage_of(r) not in ("plain", "base")
    }
    assert attacked == after_base
    clean_right = {int(str(r["index"])) for r in both.samples if r["clean_pred"] == r["label"]}
    assert len(after_base) < len(clean_right)  # the first stages broke some: not a no-op


def test_the_model_as_its_own_surrogate_gives_plain_autoattack(
    nets: tuple[nn.Module, nn.Module, DataSplits],
) -> None:
    base, _, splits = nets
    attacks = ("apgd-ce", "apgd-t")
    rec = evaluate_msa(
        base,
        splits.test,
        [("self", base)],
        eps=0.1,
        n=40,
        batch_size=20,
        attacks=attacks,
        progress=False,
    )
    ref = evaluate(
        base,
        splits.test,
        AutoAttack(eps=0.1, attacks=attacks),
        n=40,
        batch_size=20,
        progress=False,
    )
    assert rec.plain_robust_accuracy == ref.robust_accuracy == rec.robust_accuracy
    assert 0 < ref.robust_accuracy < ref.clean_accuracy
    assert [(r["robust"], r["broken_by"]) for r in rec.samples] == [
        (r["robust"], None if r["broken_by"] is None else f"plain/{r['broken_by']}")
        for r in ref.samples
    ]
    assert rec.stages[1]["broken"] == 0


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.6)])
def test_examples_lie_in_the_threat_model_and_fool_the_defence(
    nets: tuple[nn.Module, nn.Module, DataSplits], norm: str, eps: float
) -> None:
    base, other, splits = nets
    hard = HardDecision(base).eval()
    ensemble = AutoAttack(norm=norm, eps=eps, attacks=("apgd-ce", "fab-t"))
    x, y = splits.test.x[:24], splits.test.y[:24]
    with frozen_eval(hard):
        # the weaker net as the surrogate: some of its examples fool it and not the defence
        # (so judging by the surrogate would call points broken that are not)
        own = ensemble.components()[0][1](other, x, y)
        assert bool(((other(own).argmax(1) != y) & (hard(own).argmax(1) == y)).any())
        out = msa_batch(hard, msa_stages(hard, [("other", other)], ensemble), x, y)
        pred = hard(out.x_adv).argmax(1)
    assert bool(ensemble.threat.contains(x, out.x_adv).all())
    broken = torch.tensor([b is not None for b in out.broken_by])
    assert any(str(b).startswith("other/") for b in out.broken_by)
    assert bool((pred[broken] != y[broken]).all())
    assert torch.equal(out.x_adv[~broken], x[~broken])  # no example kept for unbroken points
    assert torch.equal(out.final_pred, pred) and out.disagreements == 0


def test_every_judgement_sees_the_whole_evaluation_batch(
    nets: tuple[nn.Module, nn.Module, DataSplits],
) -> None:
    base, _, splits = nets
    judge = Recorder(HardDecision(base)).eval()
    ensemble = AutoAttack(eps=0.1, attacks=("apgd-ce", "apgd-t"))
    x, y = splits.test.x[:16], splits.test.y[:16]
    with frozen_eval(judge):
        out = msa_batch(judge, msa_stages(judge, [("base", base)], ensemble)[1:], x, y)
    assert sum(b is not None for b in out.broken_by) > 0  # the later judgements had fewer
    assert len(judge.seen) == 4  # clean, after each member, the final pass
    assert all(len(seen) == 16 for seen in judge.seen)  # points to attack, never a sub-batch


def test_batch_size_one_gives_the_result_of_a_larger_batch_on_a_batch_independent_model(
    nets: tuple[nn.Module, nn.Module, DataSplits],
) -> None:
    base, _, splits = nets
    hard = HardDecision(base).eval()
    # FAB-T's first run has no random start: per point, the same attack at any batch size
    kw = {"eps": 0.1, "n": 6, "attacks": ("fab-t",), "progress": False}
    single = evaluate_msa(hard, splits.test, [("base", base)], batch_size=1, **kw)  # type: ignore[arg-type]
    batched = evaluate_msa(hard, splits.test, [("base", base)], batch_size=6, **kw)  # type: ignore[arg-type]
    assert (single.batch_size, batched.batch_size) == (1, 6)
    assert single.robust_accuracy < single.plain_robust_accuracy  # the surrogate broke some
    assert [(r["robust"], r["broken_by"]) for r in single.samples] == [
        (r["robust"], r["broken_by"]) for r in batched.samples
    ]


class BatchShift(nn.Module):
    """A toy batch-dependent defence: every row's logits get the batch's mean probabilities
    added (scaled), so each prediction leans towards the classes of the rest of its batch."""

    def __init__(self, base: nn.Module, weight: float) -> None:
        """Wrap ``base``; ``weight`` scales the batch term."""
        super().__init__()
        self.base, self.weight = base, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base's logits plus ``weight`` times the batch mean of its probabilities."""
        z: torch.Tensor = self.base(x)
        return z + self.weight * z.softmax(1).mean(0, keepdim=True)


def test_a_batch_dependent_defence_at_batch_size_one_keeps_its_verdicts_in_the_last_pass(
    nets: tuple[nn.Module, nn.Module, DataSplits],
) -> None:
    base, _, splits = nets
    shifted = BatchShift(base, 20.0).eval()
    kw = {"eps": 0.1, "n": 12, "attacks": ("apgd-ce",), "progress": False}
    alone = evaluate_msa(shifted, splits.test, [("base", base)], batch_size=1, **kw)  # type: ignore[arg-type]
    # judged alone, a point's last pass repeats the judgement that decided it
    assert alone.final_batch_disagreements == 0 and alone.batch_size == 1
    assert not any("depends on its batch" in w for w in alone.warnings)
    assert alone.robust_accuracy <= alone.plain_robust_accuracy < alone.clean_accuracy


@pytest.fixture
def declared() -> Iterator[None]:
    """HardDecision declares its base as its surrogate, for one test."""

    def spec(model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The base classifier of a HardDecision."""
        assert isinstance(model, HardDecision)
        return [("base", model.base)]

    undo = declare_surrogates(HardDecision, spec)
    yield
    undo()


def test_declared_surrogates_are_found(
    nets: tuple[nn.Module, nn.Module, DataSplits], declared: None
) -> None:
    base, _, splits = nets
    kw = {"eps": 0.1, "n": 10, "attacks": ("apgd-ce",), "progress": False}
    found = evaluate_msa(HardDecision(base).eval(), splits.test, **kw)  # type: ignore[arg-type]
    given = evaluate_msa(HardDecision(base).eval(), splits.test, [("base", base)], **kw)  # type: ignore[arg-type]
    assert found.attack["surrogates"] == ["base"]
    assert found.samples == given.samples and found.robust_accuracy < found.plain_robust_accuracy


@pytest.mark.parametrize(
    ("surrogates", "kwargs", "message"),
    [
        (None, {}, "MLP has no declared surrogates; the MSA protocol needs them"),
        ([], {}, "MSA needs at least one surrogate"),
        ([("a", None), ("a", None)], {}, "surrogate names must be distinct"),
        ([("plain", None)], {}, "not 'plain'"),
        ([("s", "not a module")], {}, "surrogate 's' is not a torch module"),
        ([("s", None)], {"batch_size": 0}, "batch size must be >= 1, got 0"),
        ([("s", None)], {"n": 0}, "n must be >= 1"),
        ([("s", None)], {"version": "fast"}, "unknown AutoAttack version"),
        ([("s", None)], {"surrogate_attacks": ("square",)}, "runs in the plain stage"),
        ([("s", None)], {"attacks": ("square",)}, "has no gradient member to run on the surr"),
        ([("s", None)], {"surrogate_attacks": ("pgd",)}, "unknown AutoAttack sub-attack pgd"),
    ],
)
def test_bad_msa_input_gets_a_sentence(
    nets: tuple[nn.Module, nn.Module, DataSplits],
    surrogates: list[tuple[str, object]] | None,
    kwargs: dict[str, object],
    message: str,
) -> None:
    base, _, splits = nets
    given = None
    if surrogates is not None:
        given = [(name, base if s is None else s) for name, s in surrogates]
    with pytest.raises(RobustlabError, match=message):
        evaluate_msa(base, splits.test, given, eps=0.1, progress=False, **kwargs)  # type: ignore[arg-type]


def test_the_cli_runs_msa_with_declared_surrogates_and_writes_every_output(
    tmp_path: Path,
) -> None:
    cfg = TrainConfig(arch="mlp", data="digits", epochs=2, arch_options={"width": 16})
    ckpt = tmp_path / "mlp"
    train(cfg, ckpt, splits=load_data("digits"), progress=False)

    def spec(model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The loaded model (Normalize + MLP) itself."""
        return [("net", model)]

    out, db = tmp_path / "msa.json", tmp_path / "r.db"
    undo = declare_surrogates(nn.Sequential, spec)  # what a checkpoint loads: the top level
    try:
        args = ["eval", "--model", str(ckpt), "--data", "digits", "--protocol", "msa"]
        args += ["--eps", "0.1", "--n", "12", "--batch-size", "5", "--attacks", "apgd-ce,fab-t"]
        args += ["--surrogate-attacks", "apgd-ce", "--json", str(out), "--store", str(db)]
        assert main([*args, "--device", "cpu", "--no-progress"]) == 0
    finally:
        undo()
    rec = json.loads(out.read_text())
    assert rec["kind"] == "msa" and rec["batch_size"] == 5 and rec["n"] == 12
    assert [s["stage"] for s in rec["stages"]] == ["plain", "net"]
    assert [p["attack"] for p in rec["per_attack"]] == [
        "plain/apgd-ce",
        "plain/fab-t",
        "net/apgd-ce",
    ]
    assert rec["robust_accuracy"] <= rec["plain_robust_accuracy"] <= rec["clean_accuracy"]
    rows = (tmp_path / "msa.samples.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 and rec["samples_file"].endswith("msa.samples.csv")
    stored = ResultStore(db).records(kind="msa")
    assert len(stored) == 1 and stored[0]["robust_accuracy"] == rec["robust_accuracy"]
    assert main(["report", "--store", str(db), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Defended models under MSA" in page and "could not be shown" not in page
    assert "<p class=muted>data: digits</p>" in page  # the header names the data MSA ran on
    assert f"<b>{100 * rec['robust_accuracy']:.1f} %</b>" in page


def test_a_killed_msa_run_resumes_and_the_key_covers_the_surrogates(
    nets: tuple[nn.Module, nn.Module, DataSplits], tmp_path: Path
) -> None:
    base, other, splits = nets
    hard = HardDecision(base).eval()
    progress = tmp_path / "msa.progress.jsonl"
    kw = {"eps": 0.1, "n": 12, "batch_size": 4, "attacks": ("apgd-ce",), "progress": False}
    whole = evaluate_msa(hard, splits.test, [("base", base)], **kw)  # type: ignore[arg-type]
    first = evaluate_msa(
        hard,
        splits.test,
        [("base", base)],
        resume=progress,
        keep_resume=True,
        **kw,  # type: ignore[arg-type]
    )
    lines = progress.read_text().splitlines()
    assert len(lines) == 1 + 3 and first.resumed_batches == 0
    progress.write_text("\n".join(lines[:2]) + "\n")  # killed after its first batch
    again = evaluate_msa(hard, splits.test, [("base", base)], resume=progress, **kw)  # type: ignore[arg-type]
    assert again.resumed_batches == 1 and not progress.exists()
    assert again.samples == whole.samples == first.samples
    assert again.stages[1]["broken"] == whole.stages[1]["broken"] > 0
    progress.write_text("\n".join(lines[:2]) + "\n")
    for surrogates in ([("other", other)], [("renamed", base)]):
        with pytest.raises(RobustlabError, match="holds progress of a different evaluation"):
            evaluate_msa(hard, splits.test, surrogates, resume=progress, **kw)  # type: ignore[arg-type]
    edited = json.loads(lines[1])
    edited["disagreements"] = -1
    progress.write_text(lines[0] + "\n" + json.dumps(edited) + "\n")
    with pytest.raises(RobustlabError, match="is damaged or was edited"):
        evaluate_msa(hard, splits.test, [("base", base)], resume=progress, **kw)  # type: ignore[arg-type]
