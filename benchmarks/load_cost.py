"""The cost of loading each kind of model ``--model`` accepts, for one network (torchvision's
resnet18, 10 classes, 3x32x32 inputs, 11.2 M parameters) stored every way:

- ``checkpoint``: a robustlab checkpoint of it (safetensors + manifest, arch torchvision:resnet18)
- ``torchvision``: ``torchvision:resnet18`` with ``--weights`` a safetensors file
- ``timm``: ``timm:resnet18`` with ``--weights`` a safetensors file (timm's own resnet18)
- ``python``: ``python:net.py:make`` (the factory builds torchvision's resnet18) with weights
- ``torchscript``: the traced network as a TorchScript file
- ``zoo``: for scale, a robustlab checkpoint of the zoo's resnet20 (0.27 M parameters)

Each kind is loaded in a fresh interpreter (robustlab and torch imported before the clock
starts): ``first`` is the first load there (it imports torchvision or timm if the kind needs
them; the last two lines time those imports alone), ``again`` the median of the next
``--repeat`` loads in that process. Needs torchvision
and timm (the venv of ``pytest -m foreign``):

    OMP_NUM_THREADS=1 python benchmarks/load_cost.py --repeat 5

Results, with their date: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

FACTORY = """
import torchvision


def make():
    return torchvision.models.resnet18(num_classes=10)
"""

TIMED = """
import json, statistics, sys, time
import robustlab
from robustlab.models.checkpoint import load_checkpoint
from robustlab.models.foreign import ForeignOptions

spec, options, repeat = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
foreign = ForeignOptions.of(**options) if options else None
times = []
for _ in range(repeat + 1):
    t0 = time.perf_counter()
    load_checkpoint(spec, foreign=foreign)
    times.append(time.perf_counter() - t0)
print(json.dumps({"first_s": times[0], "again_s": statistics.median(times[1:])}))
"""


def _prepare(root: Path) -> dict[str, tuple[str, dict[str, object]]]:
    """Store the network every way; returns each kind's spec and options."""
    import timm  # type: ignore[import-not-found,unused-ignore]
    import torch
    import torchvision  # type: ignore[import-not-found,unused-ignore]
    from safetensors.torch import save_file

    from robustlab.models import build_model
    from robustlab.models.checkpoint import model_config, save_checkpoint

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    save_file(net.state_dict(), str(root / "tv.safetensors"))
    save_file(
        timm.create_model("resnet18", num_classes=10).state_dict(), str(root / "timm.safetensors")
    )
    (root / "net.py").write_text(textwrap.dedent(FACTORY))
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.rand(2, 3, 32, 32))  # type: ignore[no-untyped-call]
    traced.save(str(root / "model.ts"))
    full = build_model("torchvision:resnet18", 3, 10, 32)
    full[1].load_state_dict(net.state_dict())
    config = model_config("torchvision:resnet18", 3, 10, 32, [0.0] * 3, [1.0] * 3)
    save_checkpoint(full, root / "ckpt", {"model": config})
    zoo = build_model("resnet20", 3, 10, 32)
    save_checkpoint(
        zoo, root / "zoo", {"model": model_config("resnet20", 3, 10, 32, [0.0] * 3, [1.0] * 3)}
    )
    given: dict[str, object] = {"mean": 0.0, "std": 1.0, "input_size": [3, 32, 32]}
    return {
        "zoo": (str(root / "zoo"), {}),
        "checkpoint": (str(root / "ckpt"), {}),
        "torchvision": ("torchvision:resnet18", {**given, "weights": str(root / "tv.safetensors")}),
        "timm": ("timm:resnet18", {**given, "weights": str(root / "timm.safetensors")}),
        "python": (
            f"python:{root / 'net.py'}:make",
            {**given, "weights": str(root / "tv.safetensors")},
        ),
        "torchscript": (str(root / "model.ts"), given),
    }


IMPORT = """
import json, sys, time
import robustlab.models.checkpoint
t0 = time.perf_counter()
__import__(sys.argv[1])
print(json.dumps({"first_s": time.perf_counter() - t0}))
"""


def _run(code: str, argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run a snippet in a fresh interpreter; its last line of output, as JSON."""
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, check=True, capture_output=True, text=True
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Time each kind's loading in its own interpreter and print a JSON line per kind."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=5, help="loads after the first, per kind")
    args = p.parse_args()
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        kinds = _prepare(Path(tmp))
        for kind, (spec, options) in kinds.items():
            timed = _run(TIMED, [spec, json.dumps(options), str(args.repeat)], env)
            print(json.dumps({"kind": kind, **timed}), flush=True)
        for module in ("torchvision.models", "timm"):  # what a first load of theirs includes
            print(json.dumps({"kind": f"import {module}", **_run(IMPORT, [module], env)}))


if __name__ == "__main__":
    main()
