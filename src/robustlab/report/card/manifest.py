"""What a model card takes from the model's own manifest: what the model is, what it was made
from, its data and training recipe, the numbers it states, and the budget to suggest."""

from __future__ import annotations

from typing import Any

from ...models.pretrained import is_zoo, zoo_entry
from .text import Rows, flat_items, pct, setting_name, value_text

#: Training settings shown first, in this order, under these names.
RECIPE_FIRST = {
    "method": "method",
    "norm": "norm",
    "eps": "eps",
    "epochs": "epochs",
    "steps": "attack steps",
    "alpha_ratio": "step size (x eps / steps)",
    "beta": "beta",
    "eps_warmup": "eps warm-up (fraction of training)",
    "batch_size": "batch size",
    "lr": "learning rate",
    "momentum": "momentum",
    "weight_decay": "weight decay",
    "seed": "seed",
    "data": "data",
}
#: Manifest entries too long or too internal to show in a recipe.
RECIPE_SKIP = ("engine", "indices", "class_names", "loss_per_epoch", "loss", "unit_names")
#: Budgets suggested in "produce results with" commands when the manifest names none: the
#: field's usual Linf budgets (MNIST 0.3, CIFAR 8/255), by input channels.
SUGGESTED_EPS = {1: 0.3, 3: 0.031}


def identity(manifest: dict[str, Any], model: str, parameters: int | None) -> Rows:
    """What the model is: architecture, size, input, classes, heads, source, its hash."""
    m = manifest.get("model") or {}
    sha = (manifest.get("weights") or {}).get("sha256")
    options = m.get("options") or {}
    rows: Rows = [
        ("model", model),
        (
            "architecture",
            str(m.get("arch", "–")) + (f" ({value_text(options)})" if options else ""),
        ),
    ]
    if parameters is not None:
        rows.append(("parameters", f"{parameters:,}"))
    if m.get("in_channels") is not None:
        side = m.get("image_size")
        rows.append(("input", f"{m['in_channels']} x {side} x {side}, pixels in [0, 1]"))
    if m.get("num_classes") is not None:
        rows.append(("classes", str(m["num_classes"])))
    if m.get("mean") is not None:
        norm = f"mean {value_text(m.get('mean'))}, std {value_text(m.get('std'))}"
        rows.append(("normalisation (inside the model)", norm))
    exits = m.get("multi_exit")
    if isinstance(exits, dict):
        where = f"after units {value_text(exits.get('positions'))}"
        rule = f"rule {exits.get('rule')}, threshold {value_text(exits.get('threshold'))}"
        rows.append(("early exits", f"{where}; {rule}"))
    if isinstance(m.get("hpm"), dict):
        rows.append(("HPM head", value_text(m["hpm"].get("config") or {})))
    quant = manifest.get("quantization")
    if isinstance(quant, dict):
        rows.append(("quantization", f"{quant.get('scheme', 'int8')} ({quant.get('backend')})"))
    source = manifest.get("source")
    if isinstance(source, dict):
        rows.append(("source", value_text({k: v for k, v in source.items() if k != "sha256"})))
    elif manifest.get("format") == "legacy-pt":
        rows.append(("source", "a legacy .pt/.pth weights file, without a manifest"))
    elif manifest.get("format") == "robustlab-checkpoint":
        made = f"written {manifest.get('created', '?')} by robustlab {manifest.get('robustlab_version', '?')}"
        rows.append(("source", f"robustlab checkpoint, {made}"))
    if is_zoo(model):
        rows.append(("shipped", shipped(model)))
    rows.append(("weights SHA-256", sha or "none: no stored record can be tied to this model"))
    observers = (quant or {}).get("observers") if isinstance(quant, dict) else None
    if isinstance(observers, dict) and observers.get("sha256"):
        rows.append(
            (
                "int8 observers SHA-256",
                f"{observers['sha256']} (the hash above is of the float weights it keeps)",
            )
        )
    of = (manifest.get("weights") or {}).get("sha256_of")
    if of:
        rows.append(("hash taken of", str(of)))
    return rows


def shipped(model: str) -> str:
    """What robustlab's zoo states of a shipped model: its AutoAttack run and its recipe."""
    card = zoo_entry(model).card
    aa = card["autoattack"]
    return (
        f"in robustlab's zoo; its card records AutoAttack {aa['version']} at {aa['norm']} eps "
        f"{aa['eps']:g} on {aa['n']} test points: {pct(aa['robust_accuracy'])} robust, "
        f"{pct(aa['clean_accuracy'])} clean ({aa['date']}: {aa['command']}); trained by: "
        f"{card['recipe']['command']}"
    )


def derived_from(manifest: dict[str, Any]) -> Rows:
    """The models this one was made from (an HPM head's base, a multi-exit backbone, the
    model a pruned or int8 one was made of), with their hashes."""
    rows: Rows = []
    places = [
        ("base model", manifest.get("base")),
        ("backbone", manifest.get("backbone")),
        ("pruned from", (manifest.get("pruning") or {}).get("base")),
        ("quantized from", (manifest.get("quantization") or {}).get("base")),
    ]
    seen = set()
    for what, info in places:
        if isinstance(info, dict) and info.get("sha256") and info["sha256"] not in seen:
            seen.add(info["sha256"])
            where = f"{info.get('arch', '?')} at {info.get('path', '?')}"
            rows.append((what, f"{where}, weights SHA-256 {info['sha256']}"))
    return rows


def dataset(manifest: dict[str, Any]) -> Rows:
    """The data the model was trained on, as its manifest states it."""
    d = manifest.get("dataset")
    if not isinstance(d, dict):
        return []
    rows: Rows = [("dataset", str(d.get("name", "–")))]
    for key, name in (
        ("train_size", "training points"),
        ("calibration_size", "held out of training"),
        ("test_size", "test points"),
        ("num_classes", "classes"),
        ("shape", "image shape"),
        ("seed", "split seed"),
    ):
        if key in d:
            rows.append((name, value_text(d[key])))
    return rows


def _rows(section: dict[str, Any]) -> Rows:
    """A manifest section as rows, long internal entries left out."""
    return [(setting_name(k), value_text(v)) for k, v in flat_items(section, RECIPE_SKIP)]


def _stage(section: dict[str, Any]) -> Rows:
    """One training stage: the usual settings first (named), then every other entry. A
    setting left unset (none, empty) does not apply to the method and is left out; a method
    given as a mapping shows its name, its other entries follow as ``method ...``."""
    given = {k: v for k, v in section.items() if v is not None and v != {}}
    method = given.get("method")
    if isinstance(method, dict):
        given["method"] = method.get("name", "?")
        given["method_settings"] = {k: v for k, v in method.items() if k != "name"}
    config = given.get("method_config")
    if isinstance(config, dict) and set(config) <= {"name"}:
        del given["method_config"]  # only repeats the method's name
    rows: Rows = [(RECIPE_FIRST[k], value_text(given[k])) for k in RECIPE_FIRST if k in given]
    return rows + _rows({k: v for k, v in given.items() if k not in RECIPE_FIRST})


def recipe(manifest: dict[str, Any]) -> list[tuple[str, Rows]]:
    """The training recipe as stages: one plain training, or each stage of a derived model
    (base + HPM fine-tuning, backbone + exits), then pruning, quantization, calibration."""
    stages: list[tuple[str, Rows]] = []
    training = manifest.get("training")
    if isinstance(training, dict):
        if "method" in training or not any(isinstance(v, dict) for v in training.values()):
            extra: dict[str, Any] = {}
            if manifest.get("train_time_s") is not None:
                extra["train_time_s"] = manifest["train_time_s"]
            procs = manifest.get("processes")
            if isinstance(procs, dict) and procs.get("world_size"):
                extra["processes"] = procs["world_size"]
            stages.append(("training", _stage({**training, **extra})))
        else:
            for name, part in training.items():
                if isinstance(part, dict):
                    stages.append((f"training: {name}", _stage(part)))
    for key, title in (
        ("pruning", "pruning"),
        ("quantization", "quantization"),
        ("calibration", "early-exit calibration"),
    ):
        part = manifest.get(key)
        if isinstance(part, dict):
            stages.append((title, _rows({k: v for k, v in part.items() if k != "base"})))
    return stages


def stated(manifest: dict[str, Any]) -> Rows:
    """The numbers the manifest states of the model (measured when it was written),
    accuracies as percentages; its early-exit table is shown with the exits."""
    metrics = manifest.get("metrics")
    if not isinstance(metrics, dict):
        return []
    rows: Rows = []
    for name, value in flat_items(metrics, ("early_exit_test", *RECIPE_SKIP)):
        if "accuracy" in name and isinstance(value, float):
            shown = pct(value)
        elif "accuracy" in name and isinstance(value, list) and len(value) <= 8:
            shown = ", ".join(pct(v) for v in value)  # per exit
        else:
            shown = value_text(value)
        rows.append((setting_name(name), shown))
    return rows


def early_exit(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's early-exit test results, per calibrated accuracy drop."""
    table = (manifest.get("metrics") or {}).get("early_exit_test")
    if not isinstance(table, dict):
        return []
    keys = ("threshold", "accuracy_early_exit", "accuracy_final", "flops_saving", "efficacy", "n")
    return [
        {"drop": str(drop), **{k: res.get(k) for k in keys}}
        for drop, res in table.items()
        if isinstance(res, dict)
    ]


def training_eps(manifest: dict[str, Any]) -> float | None:
    """The Linf eps the model was adversarially trained at (of any training stage), if any."""
    training = manifest.get("training")
    if not isinstance(training, dict):
        return None
    stages = [training, *(v for v in training.values() if isinstance(v, dict))]
    for stage in stages:
        for part in (stage, stage.get("config") or {}):
            eps = part.get("eps") if isinstance(part, dict) else None
            norm = part.get("norm") if isinstance(part, dict) else None
            if isinstance(eps, (int, float)) and eps > 0 and norm in (None, "linf"):
                return float(eps)
    return None


def suggested_command(model: str, store: str, manifest: dict[str, Any]) -> str:
    """The command that stores an AutoAttack-grade evaluation of the model: at the eps it
    was adversarially trained at, else the field's usual Linf budget for its input; with the
    MSA protocol for an HPM model (whose forward hides gradients from plain attacks)."""
    eps = training_eps(manifest)
    if eps is None:
        channels = int((manifest.get("model") or {}).get("in_channels") or 3)
        eps = SUGGESTED_EPS.get(channels, SUGGESTED_EPS[3])
    data = (manifest.get("dataset") or {}).get("name")
    data_opt = f" --data {data}" if data and data != "mnist5k" else ""
    msa = " --protocol msa" if isinstance((manifest.get("model") or {}).get("hpm"), dict) else ""
    return (
        f"robustlab eval --model {model}{data_opt}{msa} --attack autoattack --eps {eps:g} "
        f"--store {store}"
    )
