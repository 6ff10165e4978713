"""Tests of robustlab.models.checkpoint: round trips, tampering, every error, and unsafe pickles."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.io import atomic_write_text
from robustlab.models import build_model
from robustlab.models import checkpoint as ckpt
from robustlab.models.checkpoint import (
    MANIFEST,
    WEIGHTS,
    load_checkpoint,
    model_config,
    save_checkpoint,
)
from robustlab.models.registry import shapes_only
from robustlab.version import __version__

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch's pickle-protocol notes

# (arch, in_channels, image_size, mean, std)
ROUND_TRIP = [
    ("resnet8", 3, 8, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]),
    ("vit", 1, 8, [0.13], [0.31]),
    ("densenet", 3, 8, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ("mlp", 1, 8, [0.0], [1.0]),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: threads only add overhead (and stall on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_like(
    arch: str, in_channels: int, size: int, mean: list[float], std: list[float]
) -> nn.Sequential:
    """A model whose weights and BatchNorm statistics are not the initial ones."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = build_model(arch, in_channels=in_channels, image_size=size, mean=mean, std=std)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
            model.train()
            model(torch.rand(8, in_channels, size, size))  # moves BatchNorm running stats
    return model


def manifest_for(
    arch: str, in_channels: int, size: int, mean: list[float], std: list[float]
) -> dict[str, Any]:
    return {
        "model": model_config(arch, in_channels, 10, size, mean, std),
        "dataset": {"name": "toy", "samples": 8},
        "metrics": {"clean_accuracy": 0.5},
        "note": "kept as is",
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A saved mlp checkpoint folder to break in various ways."""
    spec = ROUND_TRIP[-1]
    return save_checkpoint(trained_like(*spec), tmp_path / "ckpt", manifest_for(*spec))


def edit_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=[s[0] for s in ROUND_TRIP])
def test_round_trip(tmp_path: Path, spec: tuple[str, int, int, list[float], list[float]]) -> None:
    arch, c, size, mean, std = spec
    model = trained_like(*spec)
    manifest = manifest_for(*spec)
    folder = save_checkpoint(model, tmp_path / "run" / "ckpt", manifest)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, WEIGHTS]  # no temp files left

    loaded = load_checkpoint(folder)
    assert loaded.path == folder
    assert not loaded.model.training
    assert not any(m.training for m in loaded.model.modules())
    x = torch.rand(3, c, size, size)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.eval()(x))
    for key in ("model", "dataset", "metrics", "note"):
        assert loaded.manifest[key] == manifest[key]
    assert loaded.manifest["format"] == "robustlab-checkpoint"
    assert loaded.manifest["format_version"] == ckpt.FORMAT_VERSION
    assert loaded.manifest["weights"] == {"file": WEIGHTS, "sha256": sha256(folder / WEIGHTS)}
    assert ckpt.file_sha256(folder / WEIGHTS) == sha256(folder / WEIGHTS)
    assert json.loads((folder / MANIFEST).read_text()) == loaded.manifest

    for where in (folder, str(folder), folder / MANIFEST, folder / WEIGHTS):
        again = ckpt.load(where)
        assert not again.training
        with torch.no_grad():
            assert torch.equal(again(x), loaded.model(x))


def test_saved_files_are_readable_like_any_new_file(saved: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for name in (MANIFEST, WEIGHTS):
        assert stat.S_IMODE((saved / name).stat().st_mode) == 0o666 & ~mask


def test_save_overwrites_an_older_checkpoint(saved: Path) -> None:
    spec = ROUND_TRIP[-1]
    other = trained_like(*spec)
    fc = other[1].fc
    assert isinstance(fc, nn.Linear)
    with torch.no_grad():
        fc.bias.fill_(3.0)
    save_checkpoint(other, saved, manifest_for(*spec))
    assert sorted(p.name for p in saved.iterdir()) == [MANIFEST, WEIGHTS]
    loaded_fc = ckpt.load(saved).get_submodule("net.fc")
    assert isinstance(loaded_fc, nn.Linear)
    assert torch.equal(loaded_fc.bias, torch.full((10,), 3.0))


def test_save_needs_a_model_section(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model"):
        save_checkpoint(build_model("mlp", image_size=8), tmp_path, {"dataset": {}})


# ---------------------------------------------------------------- broken checkpoints


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_weights_are_refused(saved: Path) -> None:
    flip_byte(saved / WEIGHTS, -5)  # inside the last tensor's data
    for where in (saved, saved / MANIFEST, saved / WEIGHTS):
        with pytest.raises(RobustlabError, match="do not match the hash"):
            load_checkpoint(where)


def test_tampered_weights_without_hash_still_cannot_smuggle_garbage(saved: Path) -> None:
    edit_manifest(saved, lambda m: m["weights"].pop("sha256"))
    (saved / WEIGHTS).write_bytes((saved / WEIGHTS).read_bytes()[:100])
    with pytest.raises(RobustlabError, match="cannot read weights"):
        load_checkpoint(saved, trust_unhashed=True)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["weights"].__setitem__("sha256", ""),
        lambda m: m["weights"].pop("sha256"),
        lambda m: m.pop("weights"),
    ],
    ids=["empty hash", "no hash", "no weights section"],
)
def test_an_unhashed_checkpoint_loads_only_when_trusted_and_says_so(
    saved: Path, change: Callable[[dict[str, Any]], None]
) -> None:
    edit_manifest(saved, change)
    with pytest.raises(RobustlabError, match="cannot be checked; load it only if you trust it"):
        load_checkpoint(saved)
    loaded = load_checkpoint(saved, trust_unhashed=True)
    assert loaded.manifest["weights"]["trusted_unhashed"] is True
    assert loaded.manifest["weights"]["sha256"] == sha256(saved / WEIGHTS)


def test_a_hashed_checkpoint_is_not_marked_as_trusted(saved: Path) -> None:
    assert "trusted_unhashed" not in load_checkpoint(saved).manifest["weights"]


def test_read_torch_file_never_repeats_torchs_unsafe_advice(tmp_path: Path) -> None:
    path = tmp_path / "resume.pt"
    torch.save({"epoch": 3, "note": Path("x")}, path)  # a global outside the allow-list
    with pytest.raises(RobustlabError, match="refusing to load .*resume state") as info:
        ckpt.read_torch_file(path, "a training resume state")
    assert "weights_only" not in str(info.value)
    path.write_bytes(b"")
    with pytest.raises(RobustlabError, match="resume state: it is empty or cut short"):
        ckpt.read_torch_file(path, "a training resume state")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(RobustlabError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_manifest(saved: Path) -> None:
    (saved / MANIFEST).unlink()
    for where in (saved, saved / WEIGHTS):
        with pytest.raises(RobustlabError, match=f"has no {MANIFEST}"):
            load_checkpoint(where)


def test_missing_weights(saved: Path) -> None:
    (saved / WEIGHTS).unlink()
    for where in (saved, saved / MANIFEST):
        with pytest.raises(RobustlabError, match=f"has no {WEIGHTS}"):
            load_checkpoint(where)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(RobustlabError, match=f"has no {MANIFEST}"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"format": "something-else", "model": {}}', "is not a robustlab checkpoint manifest"),
        ('{"hello": 1}', "is not a robustlab checkpoint manifest"),
        ("[1, 2, 3]", "is not a robustlab checkpoint manifest"),
        ("{not json at all", "cannot read checkpoint manifest"),
        ("", "cannot read checkpoint manifest"),
    ],
)
def test_foreign_or_garbage_manifest(saved: Path, text: str, match: str) -> None:
    (saved / MANIFEST).write_text(text)
    with pytest.raises(RobustlabError, match=match):
        load_checkpoint(saved)


def test_binary_garbage_manifest(saved: Path) -> None:
    (saved / MANIFEST).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RobustlabError, match="cannot read checkpoint manifest"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.pop("model"), "incomplete or invalid model section"),
        (lambda m: m["model"].pop("arch"), "incomplete or invalid model section"),
        (lambda m: m.__setitem__("model", "mlp"), "incomplete or invalid model section"),
        (lambda m: m["model"].__setitem__("image_size", "big"), "invalid model section"),
        (lambda m: m["model"].__setitem__("options", [1]), "invalid model section"),
        (lambda m: m["model"].__setitem__("options", {"dropout": 1}), "no option dropout"),
        (lambda m: m["model"].__setitem__("arch", "alexnet"), "unknown architecture 'alexnet'"),
        (lambda m: m.__setitem__("weights", "model.safetensors"), "invalid 'weights' section"),
        (lambda m: m.__setitem__("weights", None), "invalid 'weights' section"),
        (lambda m: m["weights"].__setitem__("sha256", "0" * 64), "do not match the hash"),
    ],
)
def test_broken_manifest_sections(
    saved: Path, change: Callable[[dict[str, Any]], None], match: str
) -> None:
    edit_manifest(saved, change)
    with pytest.raises(RobustlabError, match=match):
        load_checkpoint(saved)


@pytest.mark.parametrize("other", ["resnet8", "vit", "densenet"])
def test_weights_of_another_architecture(saved: Path, other: str) -> None:
    def swap(m: dict[str, Any]) -> None:
        m["model"]["arch"] = other
        m["weights"].pop("sha256")

    edit_manifest(saved, swap)
    with pytest.raises(RobustlabError, match="do not fit the architecture: (Missing|Unexpected)"):
        load_checkpoint(saved, trust_unhashed=True)


def test_same_architecture_other_shape_does_not_fit(saved: Path) -> None:
    edit_manifest(saved, lambda m: m["model"].__setitem__("num_classes", 7))
    with pytest.raises(RobustlabError, match="do not fit the architecture: size mismatch"):
        load_checkpoint(saved)


def test_not_a_checkpoint_file(tmp_path: Path) -> None:
    path = tmp_path / "model.txt"
    path.write_text("hello")
    with pytest.raises(RobustlabError, match=r"is not a checkpoint: give a checkpoint folder"):
        load_checkpoint(path)


# ---------------------------------------------------------------- security: unsafe pickles


class ExecPayload:
    """Unpickling this runs Python code that writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        code = f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('pwned')"
        return (builtins.exec, (code,))


class ShellPayload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def write_pickle(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


WRITERS: dict[str, Callable[[object, Path], object]] = {
    "pickle.dump": write_pickle,
    "pickle.dump-protocol0": lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=0)),
    "torch.save": lambda obj, path: torch.save(obj, path),
    "torch.save-legacy": lambda obj, path: torch.save(
        obj, path, _use_new_zipfile_serialization=False
    ),
}
PAYLOADS: dict[str, Callable[[Path], object]] = {
    "exec": ExecPayload,
    "os.system": ShellPayload,
    "exec-inside-state-dict": lambda marker: {
        "fc.weight": torch.zeros(2),
        "x": ExecPayload(marker),
    },
}


def test_payload_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    """Control: the payload used below is live, so its marker staying absent means something."""
    marker = tmp_path / "control"
    write_pickle(ExecPayload(marker), tmp_path / "control.pt")
    with open(tmp_path / "control.pt", "rb") as f:
        pickle.load(f)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_malicious_pickle_is_refused_without_running_it(
    tmp_path: Path, writer: str, payload: str, suffix: str
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    WRITERS[writer](PAYLOADS[payload](marker), evil)
    assert not marker.exists()
    legacy_options: tuple[dict[str, Any], ...] = ({}, {"arch": "mlp", "image_size": 8})
    for kwargs in legacy_options:
        with pytest.raises(RobustlabError, match="refusing to load .*could run code") as info:
            load_checkpoint(evil, **kwargs)
        message = str(info.value)
        assert "\x1b" not in message  # no terminal escapes from torch's message
        assert "weights_only` set to `False" not in message  # nor its advice to load unsafely
        with pytest.raises(RobustlabError, match="refusing"):
            ckpt.load(evil)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_not_unpickled(saved: Path) -> None:
    marker = saved.parent / "pwned"
    edit_manifest(saved, lambda m: m["weights"].pop("sha256"))
    write_pickle(ExecPayload(marker), saved / WEIGHTS)
    with pytest.raises(RobustlabError, match="cannot read weights"):
        load_checkpoint(saved, trust_unhashed=True)
    assert not marker.exists()


def test_pickle_with_other_suffix_is_not_read(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    write_pickle(ExecPayload(marker), tmp_path / "evil.pkl")
    with pytest.raises(RobustlabError, match="is not a checkpoint"):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()


# ---------------------------------------------------------------- legacy .pt files


@pytest.fixture
def resnet() -> nn.Sequential:
    return trained_like("resnet8", 3, 8, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]).eval()


# keyword arguments of load_checkpoint (its **legacy: Any)
LEGACY: dict[str, Any] = {"arch": "resnet8", "in_channels": 3, "image_size": 8}
NORM: dict[str, Any] = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_legacy_state_dict_loads_with_arch(
    tmp_path: Path, resnet: nn.Sequential, suffix: str
) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save(resnet.state_dict(), path)
    loaded = load_checkpoint(path, **LEGACY, **NORM)
    assert not loaded.model.training
    assert same_outputs(loaded.model, resnet)
    assert loaded.manifest["format"] == "legacy-pt"
    assert loaded.manifest["model"]["arch"] == "resnet8"
    assert loaded.manifest["weights"]["sha256"] == sha256(path)
    # the file's own normalize buffers win over the (default) ones, and the manifest says so
    plain = load_checkpoint(path, **LEGACY)
    assert same_outputs(plain.model, resnet)
    torch.testing.assert_close(plain.manifest["model"]["mean"], NORM["mean"])
    torch.testing.assert_close(plain.manifest["model"]["std"], NORM["std"])


def test_legacy_without_arch_asks_for_it(tmp_path: Path, resnet: nn.Sequential) -> None:
    path = tmp_path / "model.pt"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(RobustlabError, match="say which architecture it is"):
        load_checkpoint(path)


def test_legacy_inner_network_state_dict(tmp_path: Path, resnet: nn.Sequential) -> None:
    path = tmp_path / "net.pth"
    torch.save(resnet[1].state_dict(), path)  # no "normalize." or "net." prefixes
    assert same_outputs(load_checkpoint(path, **LEGACY, **NORM).model, resnet)
    # without mean/std, the defaults for 3 channels are used
    plain = load_checkpoint(path, **LEGACY)
    assert plain.manifest["model"]["mean"] == [0.0, 0.0, 0.0]
    assert plain.manifest["model"]["std"] == [1.0, 1.0, 1.0]


def test_legacy_wrapped_state_dict(tmp_path: Path, resnet: nn.Sequential) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": resnet.state_dict(), "epoch": 3}, path)
    assert same_outputs(load_checkpoint(path, **LEGACY).model, resnet)


def test_legacy_wrong_architecture_does_not_fit(tmp_path: Path, resnet: nn.Sequential) -> None:
    path = tmp_path / "model.pt"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(RobustlabError, match="do not fit the architecture"):
        load_checkpoint(path, arch="preact_resnet8", in_channels=3, image_size=8)
    with pytest.raises(RobustlabError, match="do not fit the architecture: size mismatch"):
        load_checkpoint(path, **LEGACY, num_classes=5)
    with pytest.raises(RobustlabError, match="no option dropout"):
        load_checkpoint(path, **LEGACY, dropout=0.1)
    with pytest.raises(RobustlabError, match="invalid architecture arguments"):
        load_checkpoint(path, arch="resnet8", in_channels="three")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty or cut short"),
        (b"\x80\x02", "empty or cut short"),
        (b"not a pickle at all", "refusing to load"),
        (b"this is not a pickle", "cannot read .* as a PyTorch weights file.*IndexError"),
        (b"PK\x03\x04 truncated zip", "cannot read .* as a PyTorch weights file"),
    ],
)
def test_legacy_unreadable_file(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(RobustlabError, match=match):
        load_checkpoint(path, **LEGACY)


def test_legacy_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(RobustlabError, match="does not hold a state dict of tensors"):
        load_checkpoint(path, **LEGACY)
    torch.save({"w": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(RobustlabError, match="does not hold a state dict of tensors"):
        load_checkpoint(path, **LEGACY)
    torch.save({0: torch.zeros(1)}, path)
    with pytest.raises(RobustlabError, match="does not hold a state dict of tensors"):
        load_checkpoint(path, **LEGACY)


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_text_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "first\n")
    atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_atomic_write_text_failure_keeps_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # type: ignore[arg-type]  # bad arguments on purpose

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new\n")
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(
            build_model("mlp", image_size=8), tmp_path / "ck", manifest_for(*ROUND_TRIP[-1])
        )
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["out.json"]
    assert list((tmp_path / "ck").iterdir()) == []


def test_every_saved_manifest_says_when_and_by_which_version_it_was_written(
    tmp_path: Path,
) -> None:
    net = build_model("mlp", in_channels=1, num_classes=3, image_size=4, mean=[0.0], std=[1.0])
    config = ckpt.model_config("mlp", 1, 3, 4, [0.0], [1.0])
    ckpt.save_checkpoint(net, tmp_path / "a", {"model": config})
    written = json.loads((tmp_path / "a" / ckpt.MANIFEST).read_text())
    assert written["robustlab_version"] == __version__ and written["created"][:2] == "20"
    given = {"model": config, "created": "2020-01-01T00:00:00+00:00"}
    ckpt.save_checkpoint(net, tmp_path / "b", given)  # a manifest's own value is kept
    kept = json.loads((tmp_path / "b" / ckpt.MANIFEST).read_text())
    assert kept["created"] == "2020-01-01T00:00:00+00:00"


def test_sizing_a_manifest_skips_the_initialisers_and_restores_them(
    saved: Path, tmp_path: Path
) -> None:
    # sizing on the meta device must not run normal_ there (torch would import TorchDynamo,
    # seconds on every first load); a fresh interpreter shows what a command pays
    code = (
        "import sys; from robustlab.models.checkpoint import load_checkpoint; "
        f"load_checkpoint({str(saved)!r}); print('torch._dynamo' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(ckpt.__file__).parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    before = {name: getattr(nn.init, name) for name in ("normal_", "kaiming_normal_")}
    with shapes_only():
        assert nn.init.normal_ is not before["normal_"]
        meta = build_model("resnet8", 1, 10, 28)
        real = torch.empty(1000, device="cpu")
        nn.init.normal_(real)  # still draws on real tensors
    assert {name: getattr(nn.init, name) for name in before} == before
    assert next(meta.parameters()).is_meta and float(real.std()) > 0.5
