"""robustlab monitor: compare each batch of a stream with a reference window of held-out
inputs (input statistics, confidence, predicted classes, penultimate features) at a stated
per-batch false-alarm rate; one JSON line per batch, then the summary record.

The --out file receives one line per batch (``kind: drift_batch``: each statistic's value,
raw and adjusted p-value and alarm) as soon as the batch is tested, and last the summary
(``kind: drift``), which --json and --store also take.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import JSON_MARKER, Output, read_head
from ..version import __version__
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
    json_output,
    load_args_model,
    model_info,
    say,
    store_output,
)

DESCRIPTION = (
    "drift monitoring: test each batch of a stream against a reference window at a stated "
    "false-alarm rate"
)
SHIFT_HELP = (
    "shift the stream (made for real): noise:S, blur:S, brightness:D, prior:P[,class=C] or "
    "adversarial:EPS[,attack=pgd,norm=linf,steps=10] (default: none)"
)
KINDS = ("drift_batch", "drift")


def register(sub: Any) -> None:
    """Add the monitor command."""
    p = add_command(sub, "monitor", DESCRIPTION)
    add_model_options(p)
    p.add_argument(
        "--reference",
        default="mnist5k",
        help=f"reference {DATA_HELP}; its points the model held out (calibration split, else "
        "test split)",
    )
    p.add_argument(
        "--stream",
        help=f"stream {DATA_HELP}; its test split, split off the reference's points when it "
        "is the same data (default: the reference data)",
    )
    p.add_argument("--batch-size", type=int, default=50, help="inputs per stream batch")
    p.add_argument(
        "--batches",
        type=int,
        help="batches to test; more than one pass over the stream reshuffles it, so points "
        "recur across batches (default: one pass)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="per-batch false-alarm rate: a batch from the reference's distribution raises any "
        "alarm with probability at most alpha (corrected across statistics)",
    )
    p.add_argument(
        "--permutations", type=int, default=500, help="random permutations per batch and test"
    )
    p.add_argument("--bins", type=int, default=16, help="bins of the intensity histogram")
    p.add_argument(
        "--max-reference",
        type=int,
        default=1000,
        help="most reference inputs kept (a seeded random subset of a larger window)",
    )
    p.add_argument(
        "--detector",
        metavar="ARTIFACT",
        help="a detector artifact fitted on this model (robustlab detect fit): each of its "
        "detectors' per-input scores is one more monitored statistic, inside the same "
        "false-alarm correction (default: none)",
    )
    p.add_argument("--shift", help=SHIFT_HELP)
    p.add_argument(
        "--shift-start", type=int, default=0, help="first shifted batch (to see the alarm onset)"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE.jsonl",
        help="JSON lines: one per batch, then the summary",
    )
    p.add_argument(
        "--plot", metavar="FILE.png", help="draw the alarms over the batches here (default: none)"
    )
    add_store(p, "drift")
    add_common(p, json_help="write the summary record as JSON here (default: not written)")
    add_trust_unhashed(p)
    p.set_defaults(func=run)


def is_drift_lines(path: Path) -> bool:
    """Whether a file is JSON lines robustlab monitor wrote (its first line says so)."""
    first = read_head(path, 1 << 20).split(b"\n", 1)[0]
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and JSON_MARKER in obj and obj.get("kind") in KINDS


def _plot_output(path: str | None) -> Output | None:
    """The --plot PNG (replaced only if robustlab drew it); None when not asked for."""
    from ..report.plots import is_robustlab_png

    return Output(Path(path), "--plot", ours=is_robustlab_png) if path else None


def run(args: argparse.Namespace) -> int:
    """Check options and outputs, load the model and the windows, test every batch."""
    from ..core.device import resolve_device
    from ..io import write_json
    from ..monitor.drift import DriftConfig, DriftMonitor, drift_summary
    from ..monitor.drift_data import held_out_windows
    from ..monitor.shifts import check_stream, parse_shift, stream_batches
    from ..report.drift_section import drift_plot

    config = DriftConfig(
        alpha=args.alpha,
        permutations=args.permutations,
        bins=args.bins,
        seed=args.seed,
        max_reference=args.max_reference,
    )
    shift = parse_shift(args.shift) if args.shift else None
    if shift is None and args.shift_start:
        raise RobustlabError("--shift-start says when --shift begins; give --shift as well")
    stream_spec = args.stream or args.reference
    out = Path(args.out)
    checked_outputs(
        args,
        [
            Output(out, "--out", ours=is_drift_lines),
            _plot_output(args.plot),
            json_output(args.json),
            store_output(args.store),
        ],
        models=[args.model],
        data=[args.reference, stream_spec],
        inputs=[args.detector],
    )
    suite = None
    if args.detector:  # read before any work: a wrong artifact is said at once
        from ..monitor.detectors_suite import DetectorSuite

        suite = DetectorSuite.load(args.detector)
    # a checkpoint is read alone (the windows read the data); a foreign model is built for the
    # reference's shape
    ckpt, _ = load_args_model(args, args.reference, test_only=True, read_data=False)
    windows = held_out_windows(args.reference, stream_spec, ckpt.manifest)
    check_fit(ckpt.manifest, windows.splits)
    if shift is not None:
        shift = parse_shift(args.shift, windows.splits.num_classes)
    count = check_stream(
        len(windows.stream), args.batch_size, args.batches, args.shift_start if shift else None
    )
    device = resolve_device(args.device)
    model = ckpt.model.to(device).eval()
    info = model_info(ckpt.manifest, ckpt.path)
    places = windows.info()
    say(
        f"reference window: {places['reference']['points']} {args.reference} points "
        f"({places['reference']['split']} split); stream: {places['stream']['points']} "
        f"{stream_spec} points, {count} batches of {args.batch_size}"
        + (f", shifted by {shift.spec} from batch {args.shift_start}" if shift else "")
    )
    scores = suite.to(device).input_scores(model) if suite is not None else None
    monitor = DriftMonitor(
        model,
        windows.reference.x,
        config,
        num_classes=int(ckpt.manifest["model"]["num_classes"]),
        scores=scores,
    )
    statistics = list(monitor.statistics)
    lines: list[dict[str, Any]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        batches = stream_batches(
            windows.stream,
            args.batch_size,
            batches=count,
            shift=shift,
            start=args.shift_start,
            model=model,
            seed=args.seed,
        )
        for batch in batches:
            checked = monitor.check(batch.x, batch.index, batch.y)
            line = {
                JSON_MARKER: __version__,
                **checked.to_dict(),
                "shifted": batch.shifted,
                "shift": shift.spec if batch.shifted and shift else None,
            }
            lines.append(line)
            f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            if not args.no_progress:
                said = "ALARM " + ", ".join(checked.alarms) if checked.alarm else "ok"
                say(
                    f"batch {batch.index + 1}/{count}{' (shifted)' if batch.shifted else ''}: {said}"
                )
        record = finished_record(
            args,
            {
                "kind": "drift",
                "model": info,
                "data": args.reference,
                **places,
                "shift": shift.spec if shift else None,
                "shift_start": args.shift_start if shift else None,
                "batch_size": args.batch_size,
                "alpha": config.alpha,
                "permutations": config.permutations,
                "bins": config.bins,
                "reference_used": len(monitor.reference),
                "seed": config.seed,
                "detector": args.detector,
                "correction": "Westfall-Young single-step min-P over the statistics, from the "
                "same permutations: P(any alarm | no drift) <= alpha per batch",
                "statistics": {
                    name: {"test": test, "of": what}
                    for name, (test, what) in monitor.statistics.items()
                },
                **drift_summary(lines, statistics, config.alpha),
                "files": {"lines": str(out)},
            },
        )
        f.write(json.dumps(record, sort_keys=True) + "\n")
    if args.json:
        write_json(args.json, record)
    if args.store:
        from ..store import ResultStore

        ResultStore(args.store).add(record, label=args.label or "drift")
    if args.plot:
        drift_plot(record, args.plot)
    _report(record)
    return 0


def _pct(value: Any) -> str:
    """A share as a percentage ('-' when there is none)."""
    return "-" if value is None else f"{100 * float(value):.1f} %"


def _report(record: dict[str, Any]) -> None:
    """Print what the run found."""
    print(
        f"drift monitor (alpha={record['alpha']:g} per batch): {record['alarmed']} of "
        f"{record['batches']} batches alarmed; without shift {_pct(record['false_alarm_rate'])} "
        f"({record['clean_batches']} batches), shifted {_pct(record['detection_rate'])} "
        f"({record['shifted_batches']} batches)"
    )
    if record["shift"]:
        delay = record["delay_batches"]
        print(
            f"shift {record['shift']} from batch {record['shift_start']}: "
            + (
                "no alarm after its onset"
                if delay is None
                else f"first alarm {delay} batches after its onset"
            )
        )
    for name, s in record["per_statistic"].items():
        print(
            f"  {name:20s} alarms {s['alarms']:4d}  without shift {_pct(s['alarmed_clean']):>8s}"
            f"  shifted {_pct(s['alarmed_shifted']):>8s}"
        )
    print(f"saved {record['files']['lines']}")
