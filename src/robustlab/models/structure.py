"""Where a model's parts are: its units, residual sites, exit points and penultimate features.

Every other part asks here rather than looking at model classes itself: multi-exit networks
(units and exit points), SGM and LinBP (residual sites and the SGM power), the per-unit FLOPs,
transfer's default SGM gamma, the HPM head and compressibility (the final linear layer, the
penultimate features it reads, the weight layers: conv, linear, and attention's packed input
projection).

- **Units** are the steps a multi-exit network can stop after. Each zoo architecture declares
  them beside its definition with :func:`declare_units` (a function of the network returning
  its :class:`Plan`); :func:`plan_for` cuts a ``build_model`` backbone with it.
- **Residual sites** are found by structure, never by module name: robustlab's
  :class:`~robustlab.models.blocks.ResidualBlock` and ``DenseLayer`` expose their branch;
  torchvision and timm ResNet, DenseNet and ViT blocks are recognised when those libraries
  are imported; any other block is declared with one call to :func:`declare_residual`.
- **Penultimate features** are the input of the final linear layer (the classifier head).
  Each zoo architecture names its head with :func:`declare_features`; a foreign model does
  the same with one call, e.g. ``declare_features(MyNet, "fc")``.

torchvision and timm networks are declared here too (tables of their classes, consulted only
when the library is already imported, so nothing here imports it): the residual blocks of
their ResNets, DenseNets and ViTs, the units of their ResNets (exits), and the heads of their
ResNets, DenseNets and ViTs. A class's or instance's own declaration wins over these.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from ..core.guard import evaluating
from ..errors import RobustlabError
from .blocks import Normalize, ResidualBlock

#: One step of a unit: (operation, submodule path). Operation ``"call"`` runs the submodule
#: on the features; ``FLATTEN`` flattens them to (batch, features); any other operation names
#: a method of the submodule to run on them.
Step = tuple[str, str]
FLATTEN = "torch.flatten"

BranchSpec = str | Sequence[str] | Callable[[nn.Module], nn.Module | Sequence[nn.Module]]
ChainSpec = Sequence[str] | Callable[[nn.Module], Sequence[nn.Module]]
HeadSpec = str | Callable[[nn.Module], nn.Module]

T = TypeVar("T")


class _Declarations(Generic[T]):
    """What was declared about module classes or single instances (an instance wins)."""

    def __init__(self) -> None:
        self.by_type: dict[type[nn.Module], T] = {}
        self.by_instance: weakref.WeakKeyDictionary[nn.Module, T] = weakref.WeakKeyDictionary()

    def declare(
        self, what: str, target: type[nn.Module] | nn.Module, value: T
    ) -> Callable[[], None]:
        """Record ``value`` for a class or an instance; returns the function that undoes it."""
        if isinstance(target, nn.Module):
            self.by_instance[target] = value
            ref = weakref.ref(target)

            def undo_instance() -> None:
                """Forget the declaration of this instance (if it is still this one)."""
                obj = ref()
                if obj is not None and self.by_instance.get(obj) is value:
                    del self.by_instance[obj]

            return undo_instance
        if not (isinstance(target, type) and issubclass(target, nn.Module)):
            raise RobustlabError(f"{what} needs an nn.Module subclass or instance, got {target!r}")
        self.by_type[target] = value
        cls = target

        def undo_type() -> None:
            """Forget the declaration of this class (if it is still this one)."""
            if self.by_type.get(cls) is value:
                del self.by_type[cls]

        return undo_type

    def lookup(self, module: nn.Module, extra: dict[type[nn.Module], T] | None = None) -> T | None:
        """The declaration of this module: its own, else its class's (nearest in the MRO)."""
        found = self.by_instance.get(module)
        if found is not None:
            return found
        for cls in type(module).__mro__:
            found = self.by_type.get(cls)
            if found is None and extra is not None:
                found = extra.get(cls)
            if found is not None:
                return found
        return None


def _join(prefix: str, path: str) -> str:
    """A submodule path under ``prefix`` ('' is the module itself)."""
    return ".".join(p for p in (prefix, path) if p)


# ---- units and exit points ---------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How to run a network unit by unit: the steps of each unit and of the final head."""

    units: tuple[tuple[Step, ...], ...]
    names: tuple[str, ...]
    head: tuple[Step, ...]

    def under(self, prefix: str) -> Plan:
        """The same plan with every submodule path placed under ``prefix``."""

        def move(steps: Sequence[Step]) -> tuple[Step, ...]:
            """The steps with their paths under ``prefix``."""
            return tuple((op, _join(prefix, path)) for op, path in steps)

        return Plan(tuple(move(u) for u in self.units), self.names, move(self.head))


UnitPlanner = Callable[[Any], Plan]

_UNITS: _Declarations[UnitPlanner] = _Declarations()


def declare_units(target: type[nn.Module] | nn.Module, planner: UnitPlanner) -> Callable[[], None]:
    """Say how a network class (or one network) is cut into units; returns an undo function.

    ``planner(net)`` returns a :class:`Plan` whose submodule paths are relative to ``net``.
    """
    return _UNITS.declare("declare_units", target, planner)


def sequential_units(
    layers: nn.Sequential, starts: type[nn.Module], label: str, path: str
) -> tuple[list[list[Step]], list[str]]:
    """Units of a flat ``nn.Sequential``: a new unit begins at each layer of type ``starts``."""
    units: list[list[Step]] = []
    current: list[Step] = []
    begun = False
    for i, layer in enumerate(layers):
        if isinstance(layer, starts):
            if begun:
                units.append(current)
                current = []
            begun = True
        current.append(("call", _join(path, str(i))))
    units.append(current)
    return units, [f"{label}.{k}" for k in range(len(units))]


def _resnet_blocks(net: nn.Module) -> list[str]:
    """The residual blocks of a torchvision or timm ResNet, by path (layer1.0, ...)."""
    return [
        f"layer{i}.{j}"
        for i in range(1, 5)
        if isinstance(getattr(net, f"layer{i}", None), nn.Sequential)
        for j in range(len(getattr(net, f"layer{i}")))
    ]


def _torchvision_resnet_units(net: nn.Module) -> Plan:
    """Units of a torchvision ResNet: the stem, each block; the head pools and classifies."""
    blocks = _resnet_blocks(net)
    stem = (("call", "conv1"), ("call", "bn1"), ("call", "relu"), ("call", "maxpool"))
    head = (("call", "avgpool"), (FLATTEN, ""), ("call", "fc"))
    return Plan((stem, *((("call", b),) for b in blocks)), ("stem", *blocks), head)


def _timm_resnet_units(net: nn.Module) -> Plan:
    """Units of a timm ResNet: the stem, each block; its own forward_head pools and classifies."""
    blocks = _resnet_blocks(net)
    stem = (("call", "conv1"), ("call", "bn1"), ("call", "act1"), ("call", "maxpool"))
    return Plan(
        (stem, *((("call", b),) for b in blocks)), ("stem", *blocks), (("forward_head", ""),)
    )


def _library_units() -> dict[type[nn.Module], UnitPlanner]:
    """Unit plans of torchvision and timm networks, for the libraries already imported."""
    return _library_table(
        [
            ("torchvision.models.resnet", "ResNet", _torchvision_resnet_units),
            ("timm.models.resnet", "ResNet", _timm_resnet_units),
        ]
    )


def plan_for(backbone: nn.Module, root: str = "backbone") -> Plan:
    """Cut a ``build_model`` backbone (Normalize + zoo net) into units; paths under ``root``."""
    children = dict(backbone.named_children())
    if not isinstance(children.get("normalize"), Normalize) or "net" not in children:
        raise RobustlabError(
            "exits attach to a zoo model as build_model makes it (Normalize followed by a "
            "registered network)"
        )
    net = children["net"]
    planner = _UNITS.lookup(net, _library_units())
    if planner is None:
        known = ", ".join(sorted(cls.__name__ for cls in _UNITS.by_type))
        raise RobustlabError(
            f"exits cannot attach to a {type(net).__name__}: it declares no units "
            f"(robustlab.models.structure.declare_units); these do: {known}"
        )
    plan = planner(net).under(_join(root, "net"))
    first = (("call", _join(root, "normalize")), *plan.units[0])
    return Plan((first, *plan.units[1:]), plan.names, plan.head)


def exit_points(backbone: nn.Module) -> list[str]:
    """The units an internal exit can follow (every unit but the last), by name."""
    return list(plan_for(backbone).names[:-1])


def run_steps(root: nn.Module, steps: Sequence[Step], h: torch.Tensor) -> torch.Tensor:
    """Apply ``steps`` (paths relative to ``root``) to features ``h``."""
    for op, path in steps:
        if op == FLATTEN:  # what a library network does with torch.flatten in its forward
            h = torch.flatten(h, 1)
            continue
        module = root.get_submodule(path)
        h = module(h) if op == "call" else getattr(module, op)(h)
    return h


# ---- residual sites ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ResidualSite:
    """One residual block: the modules whose outputs are its branch, and how gamma applies.

    ``ends`` are the modules whose outputs are the residual branch's output(s) (the values
    the skip path is added to or concatenated with); SGM scales each by ``gamma ** power``.
    ``branch`` is the whole branch as one module taking the block's input, when known;
    ``None`` when only the branch's last layer is known. ``chain`` is the branch as the
    modules its block runs one after another (a whole ``branch`` is a chain of one), when
    known: LinBP needs it. ``merge`` says how the branch joins the skip path: ``"add"`` or
    ``"concat"`` (a dense layer).
    """

    block: nn.Module
    ends: tuple[nn.Module, ...]
    power: float = 1.0
    branch: nn.Module | None = None
    merge: str = "add"
    chain: tuple[nn.Module, ...] = ()

    def branch_chain(self) -> tuple[nn.Module, ...]:
        """The branch as a chain of modules (the whole branch alone, if it is one); () if unknown."""
        return self.chain or ((self.branch,) if self.branch is not None else ())


@dataclass(frozen=True)
class _Residual:
    """How to find the branch of a declared residual block."""

    branch: BranchSpec
    power: float
    whole_branch: bool
    origin: str = "declared"
    merge: str = "add"
    chain: ChainSpec | None = None


_RESIDUAL: _Declarations[_Residual] = _Declarations()


def declare_residual(
    target: type[nn.Module] | nn.Module,
    branch: BranchSpec,
    *,
    power: float = 1.0,
    whole_branch: bool = False,
    chain: ChainSpec | None = None,
) -> Callable[[], None]:
    """Mark a block class (or one block) of a foreign model as residual; returns an undo function.

    ``branch`` names the submodule(s) whose output is the residual branch's output, the
    value the skip path is added to: a dotted attribute path (``"bn2"`` for a torchvision
    ``BasicBlock``, whose ``out += identity`` follows ``bn2``), several paths (a block with
    two branches), or a function of the block returning the module(s) (``lambda b: b`` when
    the block's whole output is its branch, as a DenseNet layer). SGM scales each of these
    outputs' gradient by ``gamma ** power`` (``power=0.5`` for the two sub-blocks of a
    transformer layer). ``whole_branch=True`` says the named module computes the entire
    branch from the block's input, which lets LinBP linearise and renormalise it. A branch
    that is no one module is given to LinBP as ``chain``: the attribute paths (or a function
    of the block returning the modules) that the block's forward runs one after another on
    the branch, its entry first and its output last (``["conv1", "bn1", "relu", "conv2",
    "bn2"]`` for a torchvision ``BasicBlock``); an activation module listed there is
    linearised only for as many calls per block call as it is listed (the block may call it
    again after the addition).
    """
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
        raise RobustlabError(f"declare_residual: power must be a positive number, got {power!r}")
    if isinstance(branch, str):
        branch_spec: BranchSpec = branch
    elif callable(branch):
        branch_spec = branch
    else:
        paths = tuple(branch)
        if not paths or not all(isinstance(p, str) for p in paths):
            raise RobustlabError(
                "declare_residual: branch must be an attribute path, a list of them, "
                "or a function of the block returning its branch module(s)"
            )
        branch_spec = paths
    if whole_branch and not isinstance(branch_spec, str) and not callable(branch_spec):
        raise RobustlabError("declare_residual: whole_branch needs exactly one branch module")
    if chain is not None and not callable(chain):
        chain = tuple(chain)
        if not chain or not all(isinstance(p, str) for p in chain):
            raise RobustlabError(
                "declare_residual: chain must be attribute paths or a function of the block "
                "returning the branch's modules in order"
            )
    return _RESIDUAL.declare(
        "declare_residual",
        target,
        _Residual(branch_spec, float(power), whole_branch, chain=chain),
    )


def _last_present(*names: str) -> Callable[[nn.Module], nn.Module]:
    """The last of the named submodules that exists and is not None (timm's optional layers)."""

    def pick(block: nn.Module) -> nn.Module:
        for name in reversed(names):
            found = getattr(block, name, None)
            if isinstance(found, nn.Module):
                return found
        raise RobustlabError(
            f"{type(block).__name__} has none of {', '.join(names)}; "
            "declare its residual branch with declare_residual"
        )

    return pick


def _present(*names: str) -> Callable[[nn.Module], list[nn.Module]]:
    """The named submodules that exist and are not None, in order (timm's optional layers)."""

    def pick(block: nn.Module) -> list[nn.Module]:
        found = [getattr(block, name, None) for name in names]
        return [m for m in found if isinstance(m, nn.Module)]

    return pick


def _whole(block: nn.Module) -> nn.Module:
    """The block itself: its whole output is the residual branch (DenseNet layers)."""
    return block


def _imported(module: str, name: str) -> type[nn.Module] | None:
    """A module class of a library, if that library is already imported (never imports it)."""
    mod = sys.modules.get(module)
    found = getattr(mod, name, None) if mod is not None else None
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


def _library_table(entries: Sequence[tuple[str, str, T]]) -> dict[type[nn.Module], T]:
    """Declarations about library classes, for the libraries already imported."""
    table: dict[type[nn.Module], T] = {}
    for module, name, value in entries:
        cls = _imported(module, name)
        if cls is not None:
            table[cls] = value
    return table


def _adapter_declarations() -> dict[type[nn.Module], _Residual]:
    """Residual blocks of torchvision and timm models, for those of them already imported."""
    tv, tm = "torchvision", "timm"
    return _library_table(
        [
            (
                "torchvision.models.resnet",
                "BasicBlock",
                _Residual("bn2", 1.0, False, tv, chain=("conv1", "bn1", "relu", "conv2", "bn2")),
            ),
            (
                "torchvision.models.resnet",
                "Bottleneck",
                _Residual(
                    "bn3",
                    1.0,
                    False,
                    tv,
                    chain=("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"),
                ),
            ),
            (
                "torchvision.models.densenet",
                "_DenseLayer",
                _Residual(_whole, 1.0, False, tv, "concat"),
            ),
            (
                "torchvision.models.vision_transformer",
                "EncoderBlock",
                _Residual(("dropout", "mlp"), 0.5, False, tv, chain=("ln_2", "mlp")),
            ),
            (
                "timm.models.resnet",
                "BasicBlock",
                _Residual(
                    _last_present("bn2", "se", "drop_path"),
                    1.0,
                    False,
                    tm,
                    chain=_present(
                        "conv1",
                        "bn1",
                        "drop_block",
                        "act1",
                        "aa",
                        "conv2",
                        "bn2",
                        "se",
                        "drop_path",
                    ),
                ),
            ),
            (
                "timm.models.resnet",
                "Bottleneck",
                _Residual(
                    _last_present("bn3", "se", "drop_path"),
                    1.0,
                    False,
                    tm,
                    chain=_present(
                        "conv1",
                        "bn1",
                        "act1",
                        "conv2",
                        "bn2",
                        "drop_block",
                        "act2",
                        "aa",
                        "conv3",
                        "bn3",
                        "se",
                        "drop_path",
                    ),
                ),
            ),
            ("timm.models.densenet", "DenseLayer", _Residual(_whole, 1.0, False, tm, "concat")),
            (
                "timm.models.vision_transformer",
                "Block",
                _Residual(
                    ("drop_path1", "drop_path2"),
                    0.5,
                    False,
                    tm,
                    chain=("norm2", "mlp", "ls2", "drop_path2"),
                ),
            ),
        ]
    )


def _resolve(block: nn.Module, decl: _Residual) -> ResidualSite:
    """The site of a declared block: look its branch module(s) up."""
    spec = decl.branch
    modules: list[nn.Module] = []
    if isinstance(spec, str) or (not callable(spec) and isinstance(spec, Sequence)):
        for path in [spec] if isinstance(spec, str) else list(spec):
            try:
                modules.append(block.get_submodule(path))
            except AttributeError:
                raise RobustlabError(
                    f"{type(block).__name__} was declared residual with branch '{path}', "
                    "but it has no such submodule"
                ) from None
    else:
        got = spec(block)
        modules = [got] if isinstance(got, nn.Module) else list(got)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise RobustlabError(
            f"the declared branch of {type(block).__name__} is not a module (or list of modules)"
        )
    whole = modules[0] if decl.whole_branch and len(modules) == 1 else None
    chain: tuple[nn.Module, ...] = ()
    if decl.chain is not None:
        chain = tuple(_chain_modules(block, decl.chain))
    return ResidualSite(block, tuple(modules), decl.power, whole, decl.merge, chain)


def _chain_modules(block: nn.Module, spec: ChainSpec) -> list[nn.Module]:
    """The modules of a declared branch chain, in order."""
    if callable(spec):
        found = list(spec(block))
    else:
        found = []
        for path in spec:
            try:
                found.append(block.get_submodule(path))
            except AttributeError:
                raise RobustlabError(
                    f"{type(block).__name__} was declared residual with chain step '{path}', "
                    "but it has no such submodule"
                ) from None
    if not found or not all(isinstance(m, nn.Module) for m in found):
        raise RobustlabError(f"the declared branch chain of {type(block).__name__} has no modules")
    return found


def _is_transformer_branch(branch: nn.Module) -> bool:
    """A pre-norm transformer sub-block normalises its branch input with LayerNorm."""
    return any(isinstance(m, (nn.LayerNorm, nn.MultiheadAttention)) for m in branch.modules())


def find_residual_sites(model: nn.Module) -> list[ResidualSite]:
    """Every residual block of a model, found by structure, in module order.

    SGM's power: 1 per block, 0.5 per sub-block of a pre-norm transformer layer (so that a
    whole layer is scaled by gamma).
    """
    adapters = _adapter_declarations()
    sites: list[ResidualSite] = []
    for module in model.modules():
        decl = _RESIDUAL.lookup(module, adapters)
        if decl is not None:
            sites.append(_resolve(module, decl))
        elif isinstance(module, ResidualBlock):
            power = 0.5 if _is_transformer_branch(module.branch) else 1.0
            sites.append(ResidualSite(module, (module.branch,), power, module.branch, module.merge))
    return sites


# ---- the classifier head and the penultimate features -----------------------------------

_HEADS: _Declarations[HeadSpec] = _Declarations()


def declare_features(target: type[nn.Module] | nn.Module, head: HeadSpec) -> Callable[[], None]:
    """Name the final linear layer of a network class (or one network); returns an undo function.

    ``head`` is its attribute path (``"fc"``) or a function of the network returning it; the
    penultimate features are this layer's input.
    """
    if not (isinstance(head, str) or callable(head)):
        raise RobustlabError(
            "declare_features: head must be an attribute path or a function of the network"
        )
    return _HEADS.declare("declare_features", target, head)


def _timm_classifier(net: nn.Module) -> nn.Module:
    """A timm network's classifier, as timm itself names it."""
    head = net.get_classifier()  # type: ignore[operator]
    if not isinstance(head, nn.Module):
        raise RobustlabError(f"{type(net).__name__}.get_classifier() returned no module")
    return head


def _library_heads() -> dict[type[nn.Module], HeadSpec]:
    """Classifier heads of torchvision and timm networks, for the libraries already imported."""
    return _library_table(
        [
            ("torchvision.models.resnet", "ResNet", "fc"),
            ("torchvision.models.vision_transformer", "VisionTransformer", "heads.head"),
            ("torchvision.models.densenet", "DenseNet", "classifier"),
            ("timm.models.resnet", "ResNet", _timm_classifier),
            ("timm.models.vision_transformer", "VisionTransformer", _timm_classifier),
            ("timm.models.densenet", "DenseNet", _timm_classifier),
        ]
    )


def classifier_head(model: nn.Module) -> nn.Module:
    """The final linear layer of a model (whose input is the penultimate features)."""
    heads: list[nn.Module] = []
    library = _library_heads()
    for module in model.modules():
        spec = _HEADS.lookup(module, library)
        if spec is None:
            continue
        if isinstance(spec, str):
            try:
                heads.append(module.get_submodule(spec))
            except AttributeError:
                raise RobustlabError(
                    f"{type(module).__name__} was declared with head '{spec}', "
                    "but it has no such submodule"
                ) from None
        else:
            heads.append(spec(module))
    if len(heads) != 1:
        inner = model[-1] if isinstance(model, nn.Sequential) and len(model) else model
        what = "no declared" if not heads else f"{len(heads)} declared"
        raise RobustlabError(
            f"{type(inner).__name__} has {what} classifier heads; name its final linear layer "
            "with robustlab.models.structure.declare_features"
        )
    return heads[0]


def features_and_output(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The features the final linear layer reads for inputs ``x`` and the model's output, from
    one forward pass (the head's input is caught by a hook held only during the pass)."""
    head = classifier_head(model)
    seen: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any) -> None:
        """Remember the head's input."""
        seen.append(args[0])

    handle = head.register_forward_pre_hook(keep)
    try:
        out = model(x)
    finally:
        handle.remove()
    if not seen:
        raise RobustlabError("the model's forward pass never reached its classifier head")
    return seen[-1], out


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features the final linear layer reads for inputs ``x`` (one forward pass, as is)."""
    return features_and_output(model, x)[0]


def feature_shape(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """The per-input shape of the penultimate features, from one probe pass in eval mode."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    with evaluating(model), torch.no_grad():
        h = penultimate_features(model, torch.zeros(1, *input_shape, device=device, dtype=dtype))
    return tuple(h.shape[1:])


def _is_weight_layer(module: nn.Module) -> bool:
    """A convolution, a linear layer, or an attention whose input projection is one packed weight."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight is not None
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every weight layer, with its module path, in module order (for compression, pruning, AWP).

    The weight layers are every convolution and linear layer, and every ``nn.MultiheadAttention``
    (for its packed input projection ``in_proj_weight``, ``3E x E``, listed under the attention's
    own path; its ``out_proj`` is a linear layer, listed after it). An attention whose query,
    key and value have separate weights (``kdim`` or ``vdim`` not ``embed_dim``) is not listed:
    no one weight matrix stands for its input projection (its ``out_proj`` is). Which tensor a
    layer's weight is, and its state-dict name: :mod:`robustlab.models.weights`.
    """
    return [(name, m) for name, m in model.named_modules() if _is_weight_layer(m)]


# ---- surrogates of defended models (for the MSA protocol) --------------------------------

#: A function of a defended model returning its named differentiable stand-ins.
SurrogateSpec = Callable[[nn.Module], Sequence[tuple[str, nn.Module]]]

_SURROGATES: _Declarations[SurrogateSpec] = _Declarations()


def declare_surrogates(
    target: type[nn.Module] | nn.Module, spec: SurrogateSpec
) -> Callable[[], None]:
    """Declare the surrogates of a defended model class (or one model); returns an undo function.

    ``spec(model)`` returns ``[(name, surrogate), ...]``: differentiable modules that take the
    same inputs as ``model`` and whose gradients an attacker may follow instead of its own
    (the Mixed Surrogate Attack protocol attacks each and judges on ``model``).
    """
    if not callable(spec):
        raise RobustlabError("declare_surrogates: spec must be a function of the model")
    return _SURROGATES.declare("declare_surrogates", target, spec)


def surrogates_for(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The surrogates the model itself declares, or an error saying how to declare them.

    Only the model handed in is asked, not its submodules: a submodule's surrogates take that
    submodule's inputs, not the model's (a wrapper declares its own).
    """
    spec = _SURROGATES.lookup(model)
    if spec is None:
        inner = model[-1] if isinstance(model, nn.Sequential) and len(model) else model
        raise RobustlabError(
            f"{type(inner).__name__} has no declared surrogates; the MSA protocol needs them "
            "(robustlab.models.structure.declare_surrogates, or pass surrogates explicitly)"
        )
    found = [(str(name), s) for name, s in spec(model)]
    names = [n for n, _ in found]
    if not found or len(set(names)) != len(names):
        raise RobustlabError(
            f"{type(model).__name__} declares surrogates with empty or repeated names: {names}"
        )
    return found
