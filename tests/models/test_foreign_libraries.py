"""torchvision: and timm: models (marked ``foreign``: they need torchvision and timm, which
need another torch build than the CPU one robustlab is developed on; run them with
``pytest -m foreign`` in a venv that has both, see README.md). The real libraries only:
their models load with the user's weights, SGM and LinBP act on their ResNets and ViTs as on
the robustlab equivalent, exits attach to torchvision ResNets, the HPM head's features and
compressibility's layers are found, ``robustlab train`` trains them, ``hpm``, ``prune``,
``quantize`` and ``compress`` run on a torchvision ResNet (and ``compress`` on a torchvision
ViT, whose attention is an ``nn.MultiheadAttention``) and write what reloads to the numbers
they report, and bad names, weights and offline hub requests are one sentence each."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import robustlab
from _foreign import library
from robustlab.attacks.transforms import find_residual_sites, linbp, skip_gradient
from robustlab.cli import main
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.blocks import Normalize, ResidualBlock
from robustlab.models.checkpoint import load_checkpoint
from robustlab.models.foreign import ForeignOptions
from robustlab.models.hpm import HPMClassifier
from robustlab.models.multiexit import MultiExitNetwork, attach_exits
from robustlab.models.quantized import QuantizedModel
from robustlab.models.structure import (
    classifier_head,
    features_and_output,
    plan_for,
    weight_layers,
)
from robustlab.models.weights import weight_name
from robustlab.train.hpm import clean_accuracies
from robustlab.train.loop import accuracy
from robustlab.train.prune import PruneSpec, prunable_layers, prune, sparsity_of

pytestmark = pytest.mark.foreign
tv = library("torchvision")
timm = library("timm")
tv_models = tv.models


def _x(n: int = 3, c: int = 3, side: int = 32) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(0))


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xx = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(xx), y), xx)[0]


def _hooks(model: nn.Module) -> int:
    return sum(
        len(getattr(m, a))
        for m in model.modules()
        for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
    )


# ---- loading ------------------------------------------------------------------------------


@pytest.mark.parametrize("lib", ["torchvision", "timm"])
def test_the_users_weights_load_with_shape_and_classes_read_from_them(
    lib: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    if lib == "torchvision":  # the user's own 1-channel, 7-class resnet18
        net = tv_models.resnet18(num_classes=7)
        net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    else:
        net = timm.create_model("resnet18", num_classes=7, in_chans=1)
    net.eval()
    weights = tmp_path / "w.safetensors"
    save_file(net.state_dict(), str(weights))
    torch.save(net.state_dict(), tmp_path / "w.pth")
    for file in (weights, tmp_path / "w.pth"):
        ckpt = load_checkpoint(
            f"{lib}:resnet18",
            foreign=ForeignOptions(
                weights=str(file), mean=(0.5,), std=(0.2,), input_size=(1, 32, 32)
            ),
        )
        m = ckpt.manifest["model"]
        assert (m["in_channels"], m["num_classes"], m["arch"]) == (1, 7, f"{lib}:resnet18")
        x = _x(c=1)
        torch.testing.assert_close(ckpt.model(x), net((x - 0.5) / 0.2))
        assert ckpt.manifest["source"]["kind"] == lib
    # the manifest rebuilds it through the registry, as a checkpoint of it does
    rebuilt = build_model(f"{lib}:resnet18", 1, 7, 32, [0.5], [0.2])
    rebuilt.load_state_dict(ckpt.model.state_dict())


def test_unknown_names_suggest_close_ones(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, weights)
    with pytest.raises(
        RobustlabError, match=r"torchvision has no model 'resnet81'; did you mean resnet18"
    ):
        robustlab.load("torchvision:resnet81", weights=weights)
    with pytest.raises(
        RobustlabError,
        match=r"timm has no model 'vit_tiny_patch16_24'; did you mean vit_tiny_patch16_224",
    ):
        robustlab.load("timm:vit_tiny_patch16_24", weights=weights)
    with pytest.raises(RobustlabError, match=r"torchvision has no model 'resnet81'"):
        build_model("torchvision:resnet81", 3, 10, 32)


def test_weights_of_another_architecture_name_the_keys(tmp_path: Path) -> None:
    weights = tmp_path / "r18.safetensors"
    save_file(tv_models.resnet18(num_classes=10).state_dict(), str(weights))
    with pytest.raises(
        RobustlabError, match=r"do not fit the architecture: Missing keys layer1\.2\.conv1\.weight"
    ):
        robustlab.load(
            "torchvision:resnet34", weights=weights, mean=0, std=1, input_size=(3, 32, 32)
        )
    with pytest.raises(RobustlabError, match=r"Unexpected keys fc\.weight.*|Missing keys"):
        robustlab.load(
            "timm:vit_tiny_patch16_224", weights=weights, mean=0, std=1, input_size=(3, 32, 32)
        )


def test_user_weights_without_normalisation_say_what_to_pass(tmp_path: Path) -> None:
    weights = tmp_path / "r18.safetensors"
    save_file(tv_models.resnet18(num_classes=10).state_dict(), str(weights))
    with pytest.raises(
        RobustlabError, match=r"does not declare the input normalisation.*pass --mean and --std"
    ):
        robustlab.load("torchvision:resnet18", weights=weights, input_size=(3, 32, 32))


HUB_CHILD = """
import json, robustlab
out = {}
for spec in ("torchvision:resnet18", "timm:resnet18", "torchvision:resnet18@NOPE"):
    name, _, tag = spec.partition("@")
    try:
        robustlab.load(name, weights="hub:" + tag if tag else "hub", input_size=(3, 32, 32))
    except robustlab.RobustlabError as exc:
        out[spec] = str(exc)
print(json.dumps(out))
"""


def test_hub_weights_offline_say_how_to_get_them(tmp_path: Path) -> None:
    # a fresh interpreter, so the libraries read this environment when they are imported:
    # no network, and none tried (downloads go to a closed port on this machine)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    env["HF_HUB_OFFLINE"] = "1"
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        env[var] = "http://127.0.0.1:9"
    env["PYTHONPATH"] = str(Path(robustlab.__file__).parents[1])
    run = subprocess.run(
        [sys.executable, "-c", HUB_CHILD], env=env, capture_output=True, text=True, check=True
    )
    said = json.loads(run.stdout.strip().splitlines()[-1])
    for spec in ("torchvision:resnet18", "timm:resnet18"):
        assert re.search(
            rf"cannot get the pretrained weights of {spec} .*needs a network once.*--weights FILE",
            said[spec],
        ), said[spec]
        assert "\n" not in said[spec]
    assert (
        "has no pretrained weights 'NOPE'; it has IMAGENET1K_V1"
        in said["torchvision:resnet18@NOPE"]
    )


# ---- structure: SGM and LinBP ---------------------------------------------------------------


def _zoo_like_torchvision(net: Any) -> nn.Module:
    """The same torchvision ResNet (sharing its layers) written with robustlab ResidualBlocks."""
    blocks = [
        ResidualBlock(
            nn.Sequential(b.conv1, b.bn1, nn.ReLU(), b.conv2, b.bn2), b.downsample, nn.ReLU()
        )
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
        for b in layer
    ]
    stem = [net.conv1, net.bn1, nn.ReLU(), net.maxpool]
    return nn.Sequential(*stem, *blocks, net.avgpool, nn.Flatten(), net.fc).eval()


def _zoo_like_timm(net: Any) -> nn.Module:
    """The same timm ResNet (sharing its layers) written with robustlab ResidualBlocks."""
    blocks = [
        ResidualBlock(
            nn.Sequential(b.conv1, b.bn1, b.drop_block, nn.ReLU(), b.aa, b.conv2, b.bn2),
            b.downsample,
            nn.ReLU(),
        )
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
        for b in layer
    ]
    stem = [net.conv1, net.bn1, nn.ReLU(), net.maxpool]
    return nn.Sequential(*stem, *blocks, net.global_pool, net.fc).eval()


@pytest.mark.parametrize("lib", ["torchvision", "timm"])
def test_sgm_and_linbp_on_resnets_act_as_on_the_robustlab_equivalent(lib: str) -> None:
    torch.manual_seed(0)
    if lib == "torchvision":
        net = tv_models.resnet18(num_classes=10).eval()
        same = _zoo_like_torchvision(net)
    else:  # timm zeroes each block's last BatchNorm: give the branches a gradient
        net = timm.create_model("resnet18", num_classes=10, zero_init_last=False).eval()
        same = _zoo_like_timm(net)
    x, y = _x(), torch.tensor([1, 2, 3])
    plain = _grad(net, x, y)
    torch.testing.assert_close(plain, _grad(same, x, y))
    assert len(find_residual_sites(net)) == 8
    with skip_gradient(net, 0.5):
        sgm = _grad(net, x, y)
    with skip_gradient(same, 0.5):
        torch.testing.assert_close(sgm, _grad(same, x, y), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(sgm, plain)
    for renormalize in (False, True):
        with linbp(net, -3, renormalize=renormalize):
            lin = _grad(net, x, y)
        with linbp(same, -3, renormalize=renormalize):
            torch.testing.assert_close(lin, _grad(same, x, y), rtol=1e-4, atol=1e-7)
        assert not torch.allclose(lin, plain)
    assert _hooks(net) == 0


class _LinearGELU(nn.Module):
    """GELU forward, identity backward: what LinBP makes of a GELU (written independently)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (F.gelu(x) - x).detach()


def _small_torchvision_vit() -> Any:
    torch.manual_seed(0)
    vit = tv_models.vision_transformer.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision zeroes it: no gradient at all
    return vit.eval()


def _small_timm_vit() -> Any:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2
    ).eval()


@pytest.mark.parametrize("make", [_small_torchvision_vit, _small_timm_vit])
def test_sgm_and_linbp_on_vits(make: Any) -> None:
    vit = make()
    x, y = _x(), torch.tensor([1, 2, 3])
    plain = _grad(vit, x, y)
    sites = find_residual_sites(vit)
    assert len(sites) == 2 and all(s.power == 0.5 and len(s.ends) == 2 for s in sites)
    with skip_gradient(vit, 1.0):
        torch.testing.assert_close(_grad(vit, x, y), plain)
    with skip_gradient(vit, 0.3):
        assert not torch.allclose(_grad(vit, x, y), plain)
    with linbp(vit, 0, renormalize=False):
        lin = _grad(vit, x, y)
    # the reference: every MLP's GELU made linear in the backward pass by hand
    gelus = [(p, n) for p in vit.modules() for n, c in p.named_children() if isinstance(c, nn.GELU)]
    originals = [getattr(p, n) for p, n in gelus]
    try:
        for p, n in gelus:
            setattr(p, n, _LinearGELU())
        ref = _grad(vit, x, y)
    finally:
        for (p, n), original in zip(gelus, originals, strict=True):
            setattr(p, n, original)
    torch.testing.assert_close(lin, ref, rtol=1e-4, atol=1e-7)
    with linbp(vit, 0):
        renorm = _grad(vit, x, y)
    assert not torch.allclose(renorm, lin) and not torch.allclose(renorm, plain)
    assert _hooks(vit) == 0


# ---- exits, the HPM head's features, compressibility's layers -----------------------------


def test_exits_attach_to_a_torchvision_resnet() -> None:
    torch.manual_seed(0)
    backbone = build_model("torchvision:resnet18", 1, 10, 28).eval()
    assert plan_for(backbone).names[:3] == ("stem", "layer1.0", "layer1.1")
    model = attach_exits(backbone, (1, 28, 28), 10, [0, 3, 6])
    x = _x(c=1, side=28)
    model.eval()
    torch.testing.assert_close(model(x), backbone(x))  # output="final": the backbone alone
    model.output = "all"
    every = model(x)
    assert len(every) == 4 and all(o.shape == (3, 10) for o in every)
    torch.testing.assert_close(every[-1], backbone(x))


@pytest.mark.parametrize(
    ("arch", "width"),
    [("torchvision:resnet18", 512), ("timm:resnet18", 512), ("timm:vit_tiny_patch16_224", 192)],
)
def test_penultimate_features_and_layers_are_found(arch: str, width: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 3, 10, 32).eval()
    x = _x()
    features, out = features_and_output(model, x)
    assert features.shape == (3, width)
    head = classifier_head(model)
    torch.testing.assert_close(head(features), out)
    layers = weight_layers(model)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [m for _, m in layers] == convs and len(layers) >= 20
    vit = _small_torchvision_vit()
    features, out = features_and_output(vit, x)
    torch.testing.assert_close(classifier_head(vit)(features), out)


# ---- the command line --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's resnet18 trained one epoch on digits by robustlab's own loop."""
    out = tmp_path_factory.mktemp("tv") / "r18"
    args = ["train", "--arch", "torchvision:resnet18", "--data", "digits", "--epochs", "1"]
    assert main([*args, "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    return out


def test_robustlab_train_trains_a_torchvision_architecture(trained: Path) -> None:
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "torchvision:resnet18"
    model = robustlab.load(trained)
    assert (
        isinstance(model, nn.Sequential)
        and isinstance(model[0], Normalize)
        and isinstance(model[1], tv_models.ResNet)
    )
    assert manifest["metrics"]["clean_accuracy"] > 0.3


def test_exits_command_on_a_torchvision_resnet_with_user_weights(
    trained: Path, tmp_path: Path
) -> None:
    model = robustlab.load(trained)
    assert isinstance(model, nn.Sequential)
    weights = tmp_path / "r18.safetensors"
    save_file(model[1].state_dict(), str(weights))
    normalize = model[0]
    assert isinstance(normalize, Normalize)
    mean = ",".join(str(v) for v in normalize.mean.flatten().tolist())
    std = ",".join(str(v) for v in normalize.std.flatten().tolist())
    out = tmp_path / "exits"
    args = ["exits", "--model", "torchvision:resnet18", "--weights", str(weights)]
    args += ["--mean", mean, "--std", std, "--data", "digits", "--out", str(out)]
    args += ["--exits", "0,4", "--epochs", "1", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    loaded = robustlab.load(out)
    assert isinstance(loaded, MultiExitNetwork)
    backbone = json.loads((out / "manifest.json").read_text())["backbone"]
    assert (
        backbone["source"]["kind"] == "torchvision" and backbone["arch"] == "torchvision:resnet18"
    )
    x = _x(c=1, side=8)
    torch.testing.assert_close(loaded(x), model(x))


def test_eval_records_a_timm_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()
    weights = tmp_path / "t.safetensors"
    save_file(net.state_dict(), str(weights))
    record = tmp_path / "e.json"
    args = ["eval", "--model", "timm:resnet18", "--weights", str(weights), "--mean", "0"]
    args += ["--std", "1", "--data", "digits", "--eps", "0.05", "--n", "20", "--steps", "2"]
    args += ["--json", str(record), "--device", "cpu", "--no-progress", "--engine", "torch"]
    assert main(args) == 0
    result = json.loads(record.read_text())
    info = result.get("records", [result])[0]["model"]
    assert info["source"]["kind"] == "timm" and info["arch"] == "timm:resnet18"


# ---- RobustBench --------------------------------------------------------------------------


def _robustbench() -> Any:
    """RobustBench's model table, or a skip saying why it is not here."""
    try:
        from robustbench.model_zoo import model_dicts  # type: ignore[import-not-found,unused-ignore]
        from robustbench.model_zoo.enums import (  # type: ignore[import-not-found,unused-ignore]
            BenchmarkDataset,
            ThreatModel,
        )
    except Exception as exc:
        pytest.skip(f"robustbench does not import here ({type(exc).__name__}: {exc})")
    return model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]


def test_robustbench_names_and_its_own_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = _robustbench()
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # no download leaves this machine
    with pytest.raises(
        RobustlabError, match=r"no model 'Wong2020Fas' for cifar10 Linf; did you mean Wong2020Fast"
    ):
        robustlab.load("robustbench:Wong2020Fas")
    with pytest.raises(RobustlabError, match=r"no dataset 'cifar11'; did you mean cifar10"):
        robustlab.load("robustbench:Wong2020Fast", dataset="cifar11")
    with pytest.raises(RobustlabError, match=r"no threat model 'linf2'; did you mean Linf"):
        robustlab.load("robustbench:Wong2020Fast", threat_model="linf2")
    with pytest.raises(RobustlabError, match=r"could not load Wong2020Fast .* needs a network"):
        robustlab.load("robustbench:Wong2020Fast")
    with pytest.raises(RobustlabError, match=r"--weights does not apply"):
        robustlab.load("robustbench:Wong2020Fast", weights=tmp_path / "w.pt")
    # weights where RobustBench keeps them (ours, not its download): its loader builds the
    # architecture and loads them; the model takes [0, 1] pixels (normalisation inside)
    torch.manual_seed(0)
    net = table["Wong2020Fast"]["model"]().eval()
    folder = tmp_path / "robustbench" / "cifar10" / "Linf"
    folder.mkdir(parents=True, exist_ok=True)  # the failed download made it
    torch.save(net.state_dict(), folder / "Wong2020Fast.pt")
    ckpt = load_checkpoint("robustbench:Wong2020Fast")
    x = _x()
    torch.testing.assert_close(ckpt.model(x), net(x))
    assert ckpt.manifest["source"]["name"] == "Wong2020Fast"
    assert (
        ckpt.manifest["model"]["mean"] == [0.0] * 3 and ckpt.manifest["model"]["std"] == [1.0] * 3
    )
    assert ckpt.manifest["source"]["sha256"] is not None


# ---- hpm, prune, quantize and compress on library models ----------------------------------

FAST = ["--data", "digits", "--device", "cpu", "--no-progress"]


def test_hpm_on_a_torchvision_resnet_writes_a_checkpoint_that_reloads_its_numbers(
    trained: Path, digits: DataSplits, tmp_path: Path
) -> None:
    out = tmp_path / "hpm"
    args = ["hpm", "--model", str(trained), "--out", str(out), "--eps", "0.1", "--steps", "1"]
    assert main([*args, "--epochs", "1", "--eval-batch-size", "200", *FAST]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "torchvision:resnet18"
    assert manifest["model"]["hpm"]["feature_dim"] == 512  # resnet18's fc reads 512 features
    model = robustlab.load(out)
    assert isinstance(model, HPMClassifier)
    assert isinstance(model.base.get_submodule("net"), tv_models.ResNet)
    assert not torch.equal(model.prototypes, torch.zeros_like(model.prototypes))
    # the reloaded head gives the accuracies the command measured before saving it
    acc = clean_accuracies(model, digits.test, 200)
    metrics = manifest["metrics"]
    assert (acc["fc"], acc["hpm_mix"], acc["hpm_ema"]) == (
        metrics["clean_accuracy_fc"],
        metrics["clean_accuracy_hpm_mix"],
        metrics["clean_accuracy_hpm_ema"],
    )
    assert metrics["clean_accuracy_hpm_ema"] > 0.3


def test_prune_on_a_torchvision_resnet_keeps_its_masks_through_finetuning_and_reload(
    trained: Path, digits: DataSplits, tmp_path: Path
) -> None:
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(trained), "--sparsity", "0.7", "--out", str(out)]
    assert main([*args, "--finetune-epochs", "1", *FAST]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["pruning"]
    base = robustlab.load(trained)
    names = [n for n, _ in prunable_layers(base)]
    assert [e["name"] for e in record["layers"]] == names and len(names) == 19
    assert names[0] == "net.layer1.0.conv1" and "net.layer2.0.downsample.0" in names
    model = robustlab.load(out)
    assert isinstance(model, nn.Sequential) and isinstance(model[1], tv_models.ResNet)
    assert sparsity_of(model, names) == pytest.approx(0.7, abs=1e-3)
    assert record["sparsity_after_finetune"] == pytest.approx(0.7, abs=1e-3)
    assert accuracy(model, digits.test) == manifest["metrics"]["clean_accuracy"]
    stem = dict(model.named_parameters())["net.conv1.weight"]  # the first layer is not pruned
    assert bool((stem != 0).all())


def test_structured_pruning_of_a_torchvision_block_silences_its_batchnorm_channels(
    trained: Path, digits: DataSplits
) -> None:
    model = robustlab.load(trained).eval()
    pruned = prune(model, PruneSpec(sparsity=0.3, scope="layer", structured=True))
    assert "net.layer1.0.bn1.weight" in pruned.masks and "net.layer1.0.bn2.bias" in pruned.masks
    outputs: dict[str, torch.Tensor] = {}
    blocks = ("layer1.0", "layer3.1")
    handles = [
        model.get_submodule(f"net.{b}.{bn}").register_forward_hook(
            lambda _m, _a, out, key=f"{b}.{bn}": outputs.__setitem__(key, out.detach().clone())
        )
        for b in blocks
        for bn in ("bn1", "bn2")
    ]
    try:
        with torch.no_grad():
            model(digits.test.x[:16])
    finally:
        for handle in handles:
            handle.remove()
    for b in blocks:  # a removed filter's channel is zero after its BatchNorm (trained shifts)
        for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
            weight = dict(model.named_parameters())[f"net.{b}.{conv}.weight"]
            gone = (weight == 0).flatten(1).all(dim=1)
            assert 0 < int(gone.sum()) < len(gone)
            assert bool((outputs[f"{b}.{bn}"][:, gone] == 0).all()), f"{b}.{bn}"


def test_quantize_on_a_torchvision_resnet_rebuilds_the_same_int8_model(
    trained: Path, digits: DataSplits, tmp_path: Path
) -> None:
    out = tmp_path / "int8"
    args = ["quantize", "--model", str(trained), "--out", str(out)]
    assert main([*args, "--calibration-samples", "64", *FAST]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "torchvision:resnet18"
    assert manifest["quantization"]["calibration"]["samples"] == 64
    model = robustlab.load(out)
    assert isinstance(model, QuantizedModel)
    metrics = manifest["metrics"]
    assert accuracy(model, digits.test) == metrics["clean_accuracy"]
    assert metrics["agreement_with_float"] > 0.8
    assert accuracy(model.float_model, digits.test) == metrics["clean_accuracy_float"]


def test_compress_on_a_torchvision_resnet(trained: Path, tmp_path: Path) -> None:
    record_file = tmp_path / "c.json"
    args = ["compress", "--model", str(trained), "--n", "40", "--steps", "5"]
    assert main([*args, "--json", str(record_file), *FAST]) == 0
    record = json.loads(record_file.read_text())
    model = robustlab.load(trained)
    layers = weight_layers(model)
    assert [m["name"] for m in record["layers"]] == [n for n, _ in layers] and len(layers) == 21
    state = model.state_dict()
    for m, (name, layer) in zip(record["layers"], layers, strict=True):
        weight = state[weight_name(name, layer)].double()
        assert m["shape"] == list(weight.shape)
        assert m["frobenius_norm"] == pytest.approx(float(weight.norm()), rel=1e-9)
    reps = [r["name"] for r in record["representations"]]
    assert reps == ["stem", *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2))]
    for norm in ("linf", "l2"):  # the bound follows torchvision's blocks (out += identity)
        assert record["bound"][norm]["bound"] >= record["gap"][norm]["max"]


VIT_FACTORY = """
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


def make():
    vit = VisionTransformer(
        image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )
    vit.conv_proj = nn.Conv2d(1, 32, kernel_size=4, stride=4)  # digits: one channel
    return vit
"""


def test_compress_on_a_torchvision_vit_measures_its_attention(tmp_path: Path) -> None:
    code = tmp_path / "vit.py"
    code.write_text(VIT_FACTORY)
    torch.manual_seed(0)
    namespace: dict[str, Any] = {}
    exec(compile(VIT_FACTORY, str(code), "exec"), namespace)
    net = namespace["make"]()
    nn.init.normal_(net.heads.head.weight, std=0.1)  # torchvision zeroes it
    weights = tmp_path / "vit.safetensors"
    save_file(net.state_dict(), str(weights))
    record_file = tmp_path / "c.json"
    args = ["compress", "--model", f"python:{code}:make", "--weights", str(weights)]
    args += ["--mean", "0", "--std", "1", "--n", "20", "--steps", "3"]
    assert main([*args, "--json", str(record_file), *FAST]) == 0
    record = json.loads(record_file.read_text())
    layers = {m["name"]: m for m in record["layers"]}
    attention = [m for m in record["layers"] if m["kind"] == "attention"]
    assert len(attention) == 1 and attention[0]["shape"] == [96, 32]
    name = attention[0]["name"]
    assert name.endswith("encoder.layers.encoder_layer_0.self_attention")
    w = net.encoder.layers[0].self_attention.in_proj_weight.detach().double()
    assert attention[0]["frobenius_norm"] == pytest.approx(float(w.norm()), rel=1e-9)
    sv = torch.linalg.svdvals(w)
    assert attention[0]["spectral_norm"] == pytest.approx(float(sv[0]), rel=1e-9)
    assert f"{name}.out_proj" in layers and layers[f"{name}.out_proj"]["kind"] == "linear"
    reps = {r["name"]: r for r in record["representations"]}
    assert name in reps and reps[name]["width"] == 5 * 32  # 4 patches and the class token
    assert all("refused" in record["bound"][n] for n in ("linf", "l2"))  # no bound for ViTs
