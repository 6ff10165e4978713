"""robustlab detect: adversarial-input detectors (Mahalanobis, LID, feature squeezing, logit
margin) fitted on clean held-out data, used to score inputs, and evaluated against attacks
that ignore them and against an adaptive attack on classifier and detector together.

- ``fit``: the held-out split the model's training kept out (``robustlab train
  --calibration N``; else ``--calibration N`` held out now, with a note that the model may
  have seen those inputs), detectors fitted on 60 % of it and thresholded at 5 % false
  positives on the rest; the artifact (``detector.json`` + ``detector.safetensors``) records
  the model's fingerprint.
- ``score``: per-input scores and flags of test points.
- ``eval``: AUROC, TPR at the fitted threshold and the system's robust accuracy (correct or
  flagged) per detector per attack, non-adaptive and adaptive side by side; a record for the
  results store and the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import Output, is_robustlab_json, write_json
from .common import (
    DATA_HELP,
    add_command,
    add_common,
    add_model_options,
    add_store,
    add_trust_unhashed,
    check_fit,
    checked_outputs,
    finished_record,
    is_foreign,
    json_output,
    load_model,
    load_model_and_data,
    model_info,
    model_options,
    names,
    say,
    store_output,
)

DESCRIPTION = "fit, use and evaluate adversarial-input detectors (Mahalanobis, LID, squeezing)"
DETECTOR_HELP = "the detector artifact (a folder robustlab detect fit wrote)"
EVAL_ATTACKS = ("pgd", "apgd-ce", "cw", "square", "transfer")


def register(sub: Any) -> None:
    """Add the detect command and its fit, score and eval subcommands."""
    p = add_command(sub, "detect", DESCRIPTION)
    inner = p.add_subparsers(
        dest="detect_command", required=True, metavar="STEP", help="fit, score or eval"
    )
    _register_fit(inner)
    _register_score(inner)
    _register_eval(inner)


def _register_fit(inner: Any) -> None:
    """robustlab detect fit."""
    p = add_command(inner, "fit", "fit detectors on clean held-out data and save them")
    add_model_options(p)
    p.add_argument("--data", default="mnist5k", help=f"the model's training {DATA_HELP}")
    p.add_argument("--out", required=True, help="folder for the detector artifact")
    p.add_argument(
        "--detectors",
        default="mahalanobis,lid,squeeze,margin",
        help="detectors to fit: mahalanobis, lid, squeeze, margin",
    )
    p.add_argument(
        "--calibration",
        type=int,
        help="clean samples held out of the training split to fit on (default: the split "
        "the model held out with robustlab train --calibration, else 500)",
    )
    p.add_argument(
        "--data-seed", type=int, help="seed of the held-out split (default: the model's, else 0)"
    )
    p.add_argument(
        "--test-tail",
        type=int,
        help="fit on the last N test points instead, for a model trained without a held-out "
        "split; score and eval then use only the test points before them (default: none)",
    )
    p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate of the thresholds")
    p.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="Mahalanobis' input step (Lee et al.'s preprocessing; 0: none)",
    )
    p.add_argument(
        "--fgsm-eps",
        type=float,
        default=0.1,
        help="linf eps of the FGSM examples the layer-combining regressions learn from",
    )
    add_trust_unhashed(p)
    add_common(p)
    p.set_defaults(func=run_fit)


def _register_score(inner: Any) -> None:
    """robustlab detect score."""
    p = add_command(inner, "score", "score inputs with a fitted detector and flag them")
    add_model_options(p)
    p.add_argument("--detector", required=True, help=DETECTOR_HELP)
    p.add_argument(
        "--data", default="mnist5k", help=f"inputs to score: the test split of {DATA_HELP}"
    )
    p.add_argument("--n", type=int, help="score the first n test points (default: all)")
    add_trust_unhashed(p)
    add_common(
        p, json_help="write the per-input scores and flags as JSON here (default: not written)"
    )
    p.set_defaults(func=run_score)


def _register_eval(inner: Any) -> None:
    """robustlab detect eval."""
    p = add_command(inner, "eval", "detection AUROC, TPR and system robust accuracy, adaptive too")
    add_model_options(p)
    p.add_argument("--detector", required=True, help=DETECTOR_HELP)
    p.add_argument("--data", default="mnist5k", help=f"test {DATA_HELP}")
    p.add_argument(
        "--attacks",
        default="pgd,apgd-ce,cw,square",
        help="attacks that ignore the detector: pgd, apgd-ce, cw (linf: PGD on the CW margin; "
        "l2: CW-L2), square, transfer (PGD crafted on --source)",
    )
    p.add_argument("--source", help="the transfer attack's source model (default: none)")
    p.add_argument("--eps", type=float, required=True, help="perturbation budget")
    p.add_argument("--norm", default="linf", help="norm of the budget: linf or l2")
    p.add_argument("--n", type=int, default=200, help="test points attacked")
    p.add_argument("--steps", type=int, help="steps of pgd and cw (default: the attack's)")
    p.add_argument("--queries", type=int, help="query budget of square (default: the attack's)")
    p.add_argument(
        "--adaptive-steps",
        type=int,
        default=100,
        help="steps of the adaptive attack on classifier + detector (0: none)",
    )
    p.add_argument(
        "--adaptive-restarts",
        type=int,
        default=1,
        help="random restarts of the adaptive attack (each on the points not yet broken)",
    )
    p.add_argument("--batch-size", type=int, default=100, help="points attacked at once")
    add_trust_unhashed(p)
    add_store(p, "detect")
    add_common(p)
    p.set_defaults(func=run_eval)


# ---- fit ---------------------------------------------------------------------------------


def _held_out(manifest: dict[str, Any], data: str) -> tuple[int, int] | None:
    """The calibration split (size, seed) the model held out of this data (size 0: none);
    None when it was trained on other data."""
    dataset = manifest.get("dataset")
    if not isinstance(dataset, dict) or dataset.get("name") != data:
        return None
    return int(dataset.get("calibration_size", 0) or 0), int(dataset.get("seed", 0) or 0)


def _fit_points(
    args: argparse.Namespace, manifest: dict[str, Any]
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The clean inputs to fit on (x, y), the data splits, and what the record says of them:
    the held-out split the model's training kept out, else one held out now (noted: the model
    may have seen it), or with --test-tail the last test points."""
    from ..data import load_data

    if args.test_tail is not None:
        if args.calibration is not None:
            raise RobustlabError(
                "--test-tail and --calibration are two ways to choose the fitting data: give one"
            )
        splits = load_data(args.data, test_only=True)
        total = len(splits.test)
        if not 1 <= args.test_tail < total:
            raise RobustlabError(
                f"--test-tail must be between 1 and {total - 1}, got {args.test_tail}"
            )
        check_fit(manifest, splits)
        first = total - args.test_tail
        info = {"split": "test", "first": first, "size": args.test_tail, "seen_by_model": False}
        return splits.test.x[first:], splits.test.y[first:], splits, info
    held = _held_out(manifest, args.data.strip())
    held_size, held_seed = held or (0, 0)
    size = args.calibration if args.calibration is not None else (held_size or 500)
    seed = args.data_seed if args.data_seed is not None else held_seed
    if size < 1:
        raise RobustlabError(
            "the held-out split is empty: pass --calibration N with N >= 1 samples "
            "(detectors are never fitted on the test set)"
        )
    splits = load_data(args.data, calibration=size, seed=seed)
    check_fit(manifest, splits)
    assert splits.calibration is not None
    seen = held is not None and held != (size, seed)
    if seen:
        say(
            "  note: the model was trained on other samples of this training split than the "
            f"{size} held out now (seed {seed}), so it saw some of them and the thresholds may "
            "be optimistic; train it with robustlab train --calibration N, or use --test-tail N"
        )
    info = {"split": "calibration", "size": size, "seed": seed, "seen_by_model": seen}
    return splits.calibration.x, splits.calibration.y, splits, info


def _unseen_points(suite: Any, total: int) -> int:
    """How many test points (from the first) the detectors were not fitted on."""
    held = suite.info.get("held_out") or {}
    return int(held["first"]) if held.get("split") == "test" else total


def run_fit(args: argparse.Namespace) -> int:
    """Fit the detectors on the held-out split and write the artifact."""
    import torch

    from ..attacks.registry import make_attack
    from ..core.device import resolve_device
    from ..data import load_data
    from ..monitor.detectors import check_noise
    from ..monitor.detectors_suite import JSON_FILE, TENSOR_FILE, check_names, fit_suite

    out = Path(args.out)
    outputs = [
        Output(out, "--out", folder=True),
        Output(out / JSON_FILE, "--out", ours=is_robustlab_json),
        Output(out / TENSOR_FILE, "--out", ours=lambda p: (p.parent / JSON_FILE).exists()),
        json_output(args.json),
    ]
    checked_outputs(args, outputs, models=[args.model], data=[args.data])
    chosen = check_names(names(args.detectors, "--detectors"))
    check_noise(args.noise)
    if not 0 < args.fpr < 1:
        raise RobustlabError(f"--fpr must be in (0, 1), got {args.fpr}")
    if not args.fgsm_eps > 0:
        raise RobustlabError(f"--fgsm-eps must be > 0, got {args.fgsm_eps}")
    device = resolve_device(args.device)
    foreign = args.arch is not None or is_foreign(args.model)
    ckpt = load_model(
        args.model,
        args.arch,
        load_data(args.data) if foreign else None,
        trust_unhashed=args.trust_unhashed,
        options=model_options(args),
    )
    x, y, splits, held_out = _fit_points(args, ckpt.manifest)
    model = ckpt.model.to(device).eval()
    torch.manual_seed(args.seed)
    info = model_info(ckpt.manifest, ckpt.path)
    say(f"fitting {', '.join(chosen)} on {len(x)} held-out {splits.name} samples")
    suite = fit_suite(
        model,
        x.to(device),
        y.to(device),
        int(ckpt.manifest["model"]["num_classes"]),
        names=chosen,
        fpr=args.fpr,
        noise=args.noise,
        fgsm=make_attack("fgsm", "linf", args.fgsm_eps),
        info={
            "model": info,
            "data": splits.name,
            "held_out": held_out,
        },
    )
    suite.save(out)
    fit = suite.info["fit"]
    for name, thr in suite.thresholds.items():
        say(
            f"  {name}: threshold {thr:.4g} ({100 * fit['fpr_threshold_split'][name]:.1f} % of "
            f"{fit['threshold_samples']} clean threshold-split samples flagged)"
        )
    print(f"detectors in {out}: {', '.join(chosen)}, fitted on {fit['samples']} held-out samples")
    if args.json:
        write_json(args.json, finished_record(args, {"kind": "detect-fit", **suite.manifest()}))
    return 0


# ---- score -------------------------------------------------------------------------------


def run_score(args: argparse.Namespace) -> int:
    """Per-input scores and flags of the first n test points."""
    from ..monitor.detectors_suite import DetectorSuite

    checked_outputs(
        args,
        [json_output(args.json)],
        models=[args.model],
        data=[args.data],
        inputs=[args.detector],
    )
    suite = DetectorSuite.load(args.detector)
    model, splits, device, info = load_model_and_data(args, test_only=True)
    suite.check_model(model, args.model)
    suite.to(device)
    test = splits.test
    limit = _unseen_points(suite, len(test))
    n = limit if args.n is None else args.n
    if not 1 <= n <= limit:
        raise RobustlabError(
            f"--n must be between 1 and {limit} (the test points the detectors were not fitted "
            f"on), got {n}"
        )
    x = test.x[:n].to(device)
    suite.check_inputs(x)
    scores = suite.score(model, x)
    flags = suite.flags(scores)
    import torch

    with torch.no_grad():
        pred = model(x).argmax(1).tolist()
    rows = [
        {
            "index": i,
            "label": int(test.y[i]),
            "pred": pred[i],
            "scores": {d: float(s[i]) for d, s in scores.items()},
            "flagged": {d: bool(f[i]) for d, f in flags.items()},
        }
        for i in range(n)
    ]
    for d, f in flags.items():
        print(f"{d}: flagged {int(f.sum())} of {n} inputs (threshold {suite.thresholds[d]:.4g})")
    if args.json:
        record = {
            "kind": "detect-score",
            "model": info,
            "data": splits.name,
            "detector": str(args.detector),
            "thresholds": suite.thresholds,
            "inputs": rows,
        }
        write_json(args.json, finished_record(args, record))
    return 0


# ---- eval --------------------------------------------------------------------------------


def _attack_specs(args: argparse.Namespace, splits: Any, device: str) -> list[Any]:
    """The attacks that ignore the detector, built from the registry."""
    from ..attacks.registry import make_attack
    from ..monitor.detectors_eval import AttackSpec

    chosen = names(args.attacks, "--attacks")
    unknown = [a for a in chosen if a not in EVAL_ATTACKS]
    if unknown:
        raise RobustlabError(
            f"detect eval has no attack {', '.join(unknown)}; use {', '.join(EVAL_ATTACKS)}"
        )
    if "transfer" in chosen and not args.source:
        raise RobustlabError(
            "the transfer attack needs --source MODEL (the model it is crafted on)"
        )
    if args.source and "transfer" not in chosen:
        raise RobustlabError("--source is the transfer attack's model: add transfer to --attacks")
    specs = []
    for name in chosen:
        if name == "cw" and args.norm != "l2":  # CW's margin loss under PGD (Madry et al.)
            attack = make_attack(
                "pgd", args.norm, args.eps, steps=args.steps, loss="cw", seed=args.seed
            )
        elif name == "square":
            attack = make_attack(
                "square", args.norm, args.eps, queries=args.queries, seed=args.seed
            )
        elif name == "transfer":
            attack = make_attack("pgd", args.norm, args.eps, steps=args.steps, seed=args.seed)
        else:
            attack = make_attack(name, args.norm, args.eps, steps=args.steps, seed=args.seed)
        source = None
        if name == "transfer":
            src = load_model(args.source, trust_unhashed=args.trust_unhashed)
            check_fit(src.manifest, splits)
            source = src.model.to(device).eval()
        specs.append(AttackSpec(name, attack, source))
    return specs


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate the detectors against the attacks and the adaptive attack."""
    from ..monitor.detectors_eval import adaptive_attack, evaluate_detectors
    from ..monitor.detectors_suite import DetectorSuite

    checked_outputs(
        args,
        [json_output(args.json), store_output(args.store)],
        models=[args.model, args.source],
        data=[args.data],
        inputs=[args.detector],
    )
    if args.norm not in ("linf", "l2"):
        raise RobustlabError(f"--norm must be linf or l2, got '{args.norm}'")
    if not args.eps > 0:
        raise RobustlabError(f"--eps must be > 0, got {args.eps}")
    if args.adaptive_steps < 0:
        raise RobustlabError(f"--adaptive-steps must be >= 0, got {args.adaptive_steps}")
    if args.adaptive_restarts < 1:
        raise RobustlabError(f"--adaptive-restarts must be >= 1, got {args.adaptive_restarts}")
    if args.batch_size < 1:
        raise RobustlabError(f"--batch-size must be >= 1, got {args.batch_size}")
    suite = DetectorSuite.load(args.detector)
    model, splits, device, info = load_model_and_data(args, test_only=True)
    model.eval()
    suite.check_model(model, args.model)
    suite.to(device)
    test = splits.test
    limit = _unseen_points(suite, len(test))
    if not 1 <= args.n <= limit:
        raise RobustlabError(
            f"--n must be between 1 and {limit} (the test points the detectors were not fitted "
            f"on), got {args.n}"
        )
    specs = _attack_specs(args, splits, device)
    adaptive = (
        adaptive_attack(args.norm, args.eps, args.adaptive_steps, args.seed, args.adaptive_restarts)
        if args.adaptive_steps
        else None
    )
    x, y = test.x[: args.n].to(device), test.y[: args.n].to(device)
    say(
        f"detect eval: {', '.join(suite.detectors)} on {args.n} {splits.name} points, "
        f"{args.norm} eps={args.eps}"
    )
    result = evaluate_detectors(
        model, suite, x, y, specs, adaptive=adaptive, batch_size=args.batch_size, say=say
    )
    record = {
        "kind": "detect",
        "model": info,
        "data": splits.name,
        "detector": {"path": str(args.detector), "held_out": suite.info.get("held_out")},
        "threat_model": {"norm": args.norm, "eps": args.eps},
        **result,
    }
    if args.source:
        record["source"] = str(args.source)
    record = finished_record(args, record)
    print(_summary(record))
    if args.json:
        write_json(args.json, record)
    if args.store:
        from ..store import ResultStore

        ResultStore(args.store).add(record, label=args.label or "detect")
    return 0


def _pct(v: Any) -> str:
    """A fraction as a percentage ('-' when missing)."""
    return "-" if v is None else f"{100 * float(v):5.1f} %"


def _summary(record: dict[str, Any]) -> str:
    """The side-by-side table, one line per detector."""
    lines = [
        f"{'detector':<12} {'attack':<10} {'AUROC':>7} {'TPR':>8} {'system':>8}   "
        f"{'adaptive AUROC':>14} {'TPR':>8} {'system':>8}"
    ]
    for name, both in record["side_by_side"].items():
        a, b = both.get("non_adaptive", {}), both.get("adaptive", {})
        auc_a = "-" if a.get("auroc") is None else f"{a['auroc']:.3f}"
        auc_b = "-" if b.get("auroc") is None else f"{b['auroc']:.3f}"
        lines.append(
            f"{name:<12} {str(a.get('attack', '-')):<10} {auc_a:>7} {_pct(a.get('tpr_at_threshold')):>8} "
            f"{_pct(a.get('system_robust_accuracy')):>8}   {auc_b:>14} "
            f"{_pct(b.get('tpr_at_threshold')):>8} {_pct(b.get('system_robust_accuracy')):>8}"
        )
    return "\n".join(lines)
