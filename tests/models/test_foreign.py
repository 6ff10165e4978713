"""Foreign models that need no extra package: a factory in the user's Python file with its
weights, and TorchScript files; what every foreign source is given and records; their bad
inputs, one sentence each. (torchvision, timm: tests/models/test_foreign_libraries.py.)"""

from __future__ import annotations

import hashlib
import importlib.util
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import robustlab
from robustlab.attacks.transforms import linbp, skip_gradient
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.blocks import Normalize
from robustlab.models.checkpoint import load_checkpoint, model_config, save_checkpoint
from robustlab.models.foreign import DataShape, ForeignOptions, foreign_kind
from robustlab.models.structure import classifier_head, penultimate_features

NET = '''
import torch
from torch import nn

from robustlab.models.structure import declare_features, declare_residual


class Block(nn.Module):
    """A residual block written without robustlab's classes."""

    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class Net(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, 1, 1)
        self.block = Block(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


def make():
    torch.manual_seed(0)
    return Net()


def make7():
    return Net(7)


def declared():
    declare_residual(Block, "conv2", chain=["conv1", "act", "conv2"])
    declare_features(Net, "fc")
    return Net()


def not_a_model():
    return [Net()]


def three_d():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Unflatten(1, (2, 5)))


def two_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return x.flatten(1), x.flatten(1)

    return Pair()


def broken():
    raise ValueError("no model today")
'''

SHAPE = DataShape(in_channels=1, image_size=8, num_classes=10)


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """The user's file and the network its factory builds, with other weights saved beside it
    (a safetensors file and a .pt state dict), as a user's trained weights would be."""
    folder = tmp_path_factory.mktemp("user")
    path = folder / "net.py"
    path.write_text(textwrap.dedent(NET))
    spec = importlib.util.spec_from_file_location("user_net_for_tests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(123)  # other weights than the factory's own
    net = module.Net().eval()
    save_file(net.state_dict(), str(folder / "w.safetensors"))
    torch.save(net.state_dict(), folder / "w.pt")
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, folder / "dp.pt"
    )
    return path, net


def _x(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_python_factory_with_the_users_weights_is_normalised_inside(
    user: tuple[Path, nn.Module],
) -> None:
    path, net = user
    for weights in ("w.safetensors", "w.pt", "dp.pt"):
        model = robustlab.load(
            f"python:{path}:make",
            weights=path.parent / weights,
            mean=0.5,
            std=0.25,
            input_size=(1, 8, 8),
        )
        assert isinstance(model, nn.Sequential) and isinstance(model[0], Normalize)
        x = _x()
        torch.testing.assert_close(model(x), net((x - 0.5) / 0.25)), weights
        assert not model.training


def test_the_manifest_records_what_was_loaded(user: tuple[Path, nn.Module]) -> None:
    path, _ = user
    weights = path.parent / "w.safetensors"
    ckpt = load_checkpoint(
        f"python:{path}:make",
        foreign=ForeignOptions(weights=str(weights), mean=(0.1,), std=(0.3,)),
        data=SHAPE,
    )
    source = ckpt.manifest["source"]
    assert source["kind"] == "python" and source["name"] == f"{path}:make"
    assert source["code_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ckpt.manifest["weights"]["sha256"] == source["sha256"]
    m = ckpt.manifest["model"]
    assert (m["in_channels"], m["image_size"], m["num_classes"]) == (1, 8, 10)
    assert m["mean"] == [pytest.approx(0.1)] and m["std"] == [pytest.approx(0.3)]
    # the classes come from the model's own output, not from the data
    seven = load_checkpoint(
        f"python:{path}:make7", foreign=ForeignOptions(mean=(0.0,), std=(1.0,)), data=SHAPE
    )
    assert seven.manifest["model"]["num_classes"] == 7
    assert seven.manifest["source"]["sha256"] is None  # the factory's own weights


def test_a_state_dict_saved_from_a_robustlab_model_declares_its_normalisation(
    user: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    path, net = user
    full = nn.Sequential()
    full.add_module("normalize", Normalize([0.2], [0.4]))
    full.add_module("net", net)
    save_file(full.state_dict(), str(tmp_path / "full.safetensors"))
    model = robustlab.load(
        f"python:{path}:make", weights=tmp_path / "full.safetensors", input_size=(1, 8, 8)
    )
    x = _x()
    torch.testing.assert_close(model(x), net((x - 0.2) / 0.4))


def test_torchscript_files_are_recognised_by_content(
    user: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    zoo = build_model("mlp", 1, 10, 8).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's notice
        traced = torch.jit.trace(zoo, torch.rand(2, 1, 8, 8))  # type: ignore[no-untyped-call]
    path = tmp_path / "model.pt"  # a .pt that is no state dict
    traced.save(str(path))
    assert foreign_kind(path) == "torchscript" and foreign_kind(tmp_path / "nope.pt") is None
    x = _x()
    for spec in (str(path), f"torchscript:{path}"):
        ckpt = load_checkpoint(spec, foreign=ForeignOptions(mean=(0.0,), std=(1.0,)), data=SHAPE)
        torch.testing.assert_close(ckpt.model(x), zoo(x))
        assert ckpt.manifest["source"]["kind"] == "torchscript"
        assert ckpt.manifest["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(RobustlabError, match="holds its own weights"):
        robustlab.load(path, weights=path, mean=0, std=1, input_size=(1, 8, 8))
    with pytest.raises(RobustlabError, match="TorchScript file, not a state dict"):
        _load(user, "make", weights=path, **NORMALISED)


def test_structure_the_users_file_declares_is_found(user: tuple[Path, nn.Module]) -> None:
    path, _ = user
    options = {"mean": 0, "std": 1, "input_size": (1, 8, 8)}
    plain = robustlab.load(f"python:{path}:make", **options)
    with pytest.raises(RobustlabError, match="declare_residual"), skip_gradient(plain, 0.5):
        pass
    with pytest.raises(RobustlabError, match="declare_features"):
        classifier_head(plain)
    model = robustlab.load(f"python:{path}:declared", **options)
    x, y = _x(), torch.arange(5)

    def grad() -> torch.Tensor:
        xx = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xx), y)
        return torch.autograd.grad(loss, xx)[0]

    plain_grad = grad()
    with skip_gradient(model, 0.5):
        assert not torch.allclose(grad(), plain_grad)
    with linbp(model):
        assert not torch.allclose(grad(), plain_grad)
    assert penultimate_features(model, x).shape == (5, 4)


def _load(user: tuple[Path, nn.Module], factory: str, **options: object) -> nn.Module:
    path, _ = user
    return robustlab.load(f"python:{path}:{factory}", **options)


NORMALISED = {"mean": 0, "std": 1, "input_size": (1, 8, 8)}


@pytest.mark.parametrize(
    ("factory", "options", "message"),
    [
        ("not_a_model", {}, r"returned a list, not a torch.nn.Module"),
        ("three_d", NORMALISED, r"outputs of shape \(2, 2, 5\) .* not \(batch, classes\)"),
        ("two_outputs", NORMALISED, r"returns a tuple, not a tensor of logits"),
        ("make", {"input_size": (1, 8, 8)}, r"does not declare the input normalisation.*--mean"),
        ("make", {"mean": 0, "std": 1}, r"does not declare its input size; pass --input-size"),
        ("make", {**NORMALISED, "input_size": (3, 8, 8)}, r"fails on 3x8x8 inputs.*--input-size"),
        ("make", {**NORMALISED, "num_classes": 5}, r"predicts 10 classes, but .* given is 5"),
        ("make", {**NORMALISED, "mean": (0, 0)}, r"--mean needs one value per input channel"),
        ("make", {"mean": 0, "input_size": (1, 8, 8)}, r"both --mean and --std"),
        ("make", {**NORMALISED, "input_size": (1, 8, 9)}, r"square images"),
        ("make", {**NORMALISED, "colour": 1}, r"unknown model option colour"),
        ("make", {**NORMALISED, "dataset": "cifar10"}, r"only apply to robustbench"),
        ("nope", {}, r"has no function 'nope'; it defines .*make"),
        ("broken", {}, r"make|broken\(\) failed \(ValueError: no model today\)"),
    ],
)
def test_bad_input_is_one_sentence(
    user: tuple[Path, nn.Module], factory: str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(RobustlabError, match=message) as info:
        _load(user, factory, **options)
    assert "\n" not in str(info.value)


def test_weights_that_do_not_fit_name_the_keys(
    user: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    path, net = user
    state = net.state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "fc.bias"}, r"Missing keys fc\.bias"),
        "unexpected": ({**state, "extra.weight": torch.zeros(1)}, r"Unexpected keys extra\.weight"),
        "shape": (
            {**state, "fc.weight": torch.zeros(3, 4)},
            r"size mismatch: fc\.weight is \(3, 4\) in the file, \(10, 4\) in the architecture",
        ),
    }
    for name, (bad, message) in cases.items():
        file = tmp_path / f"{name}.safetensors"
        save_file(bad, str(file))
        with pytest.raises(
            RobustlabError, match=f"weights in .*{name}.safetensors do not fit.*{message}"
        ):
            _load(user, "make", weights=file, **NORMALISED)
    with pytest.raises(RobustlabError, match="does not exist"):
        _load(user, "make", weights=tmp_path / "none.pt", **NORMALISED)


def test_specs_that_name_no_model(tmp_path: Path) -> None:
    with pytest.raises(RobustlabError, match="does not name a factory"):
        robustlab.load(f"python:{tmp_path}/net.py")
    with pytest.raises(RobustlabError, match="Python file .* does not exist"):
        robustlab.load(f"python:{tmp_path}/none.py:make")
    (tmp_path / "bad.py").write_text("import no_such_module_here\n")
    with pytest.raises(RobustlabError, match="importing .* failed \\(ModuleNotFoundError"):
        robustlab.load(f"python:{tmp_path}/bad.py:make")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RobustlabError, match="not a TorchScript file"):
        robustlab.load(f"torchscript:{tmp_path}/notes.txt")


def test_a_robustlab_checkpoint_takes_no_foreign_options(tmp_path: Path) -> None:
    model = build_model("mlp", 1, 10, 8)
    save_checkpoint(model, tmp_path / "m", {"model": model_config("mlp", 1, 10, 8, [0.0], [1.0])})
    with pytest.raises(RobustlabError, match="declares its own weights, shape and normalisation"):
        load_checkpoint(tmp_path / "m", foreign=ForeignOptions(mean=(0.5,), std=(0.2,)))


def _missing(package: str) -> bool:
    try:
        __import__(package)
    except Exception:  # not installed, or built for another torch
        return True
    return False


@pytest.mark.skipif(not _missing("torchvision"), reason="torchvision imports here")
def test_torchvision_names_without_torchvision_say_what_is_missing(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, str(file))
    with pytest.raises(RobustlabError, match="torchvision:resnet18 needs .*torchvision"):
        robustlab.load("torchvision:resnet18", weights=file, mean=0, std=1)
    with pytest.raises(RobustlabError, match="needs weights: --weights FILE .* or --weights hub"):
        robustlab.load("torchvision:resnet18")


@pytest.mark.skipif(not _missing("robustbench"), reason="robustbench is installed here")
def test_robustbench_without_the_package_says_so() -> None:
    with pytest.raises(
        RobustlabError, match=r"robustbench package, which is not installed \(pip install"
    ):
        robustlab.load("robustbench:Carmon2019Unlabeled", dataset="cifar10", threat_model="Linf")
