"""Files robustlab reads and writes: atomic writes, outputs checked before any work, and
reads of regular files only, within size limits stated in one place.

Guarantees (the README states them for users):

* **Outputs are checked before any work starts** (``check_outputs``): an output that is a
  folder, lies in a place that cannot be written, is the same file as any input (also a file
  inside an input folder, through links), or is named twice is refused; so is an existing file
  robustlab did not write, unless ``overwrite``. Inputs are never overwritten, not even with
  ``overwrite``.
* **How "robustlab wrote it" is recognised**: JSON records carry a top-level
  ``robustlab_version`` key (``json_text`` adds it); the SQLite results store carries an
  application id in its header (see ``store.py``); checkpoints have a ``manifest.json`` whose
  ``format`` is ``robustlab-checkpoint``; HTML reports a ``generator`` meta tag; PNG plots a
  ``Software`` text chunk; the per-sample CSV its exact header line. Each writer module owns its
  recogniser; ``Output`` takes it.
* **Resume state is removed only after every output was written** (``resume_state``).
* **Only regular files are read**, their size checked first (``check_regular``), so a path
  linked to ``/dev/zero`` or a FIFO is refused instead of hanging; sizes claimed by headers
  (arrays, images, model widths) are checked against ``limits()`` before anything is allocated.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import RobustlabError
from .version import __version__

JSON_MARKER = "robustlab_version"
GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Sizes robustlab accepts from files; each can be changed with ROBUSTLAB_MAX_<NAME>."""

    text_bytes: int = 256 * MiB  # a manifest, progress file or JSON record read whole
    data_bytes: int = 4 * GiB  # decoded arrays of a data source, or a weights file
    image_side: int = 4096  # pixels per side of an image, and a manifest's image_size
    classes: int = 100_000  # largest label + 1, and a manifest's num_classes
    parameters: int = 500_000_000  # parameters of a model rebuilt from a manifest


def limits() -> Limits:
    """The limits in force: the defaults, overridden by ROBUSTLAB_MAX_<NAME> variables."""
    values: dict[str, int] = {}
    for f in fields(Limits):
        env = f"ROBUSTLAB_MAX_{f.name.upper()}"
        raw = os.environ.get(env)
        if raw is None:
            continue
        try:
            value = int(raw)
        except ValueError:
            raise RobustlabError(f"{env} must be a whole number, got {raw!r}") from None
        if value < 1:
            raise RobustlabError(f"{env} must be at least 1, got {value}")
        values[f.name] = value
    return Limits(**values)


def cache_dir() -> Path:
    """The robustlab cache folder: $ROBUSTLAB_CACHE if set, else ~/.cache/robustlab."""
    env = os.environ.get("ROBUSTLAB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "robustlab"


def size_text(n: int) -> str:
    """A byte count for messages: '3.4 GB', '12 MB', '512 bytes'."""
    for unit, size in (("GB", GiB), ("MB", MiB), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


# -- reading ------------------------------------------------------------------------------


def check_regular(path: str | Path, what: str, max_bytes: int | None = None) -> int:
    """Refuse anything but an existing regular file (no device, FIFO or folder) of at most
    ``max_bytes``; return its size. Every reader of a user's file calls this first."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise RobustlabError(f"{what} {p} does not exist") from None
    except OSError as exc:
        raise RobustlabError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise RobustlabError(f"{what} {p} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise RobustlabError(
            f"{what} {p} is not a regular file (a device, pipe or socket); refusing to read it"
        )
    if max_bytes is not None and st.st_size > max_bytes:
        raise RobustlabError(
            f"{what} {p} is {size_text(st.st_size)}, more than the limit of "
            f"{size_text(max_bytes)} (raise it with ROBUSTLAB_MAX_* if you mean it)"
        )
    return int(st.st_size)


def read_regular_bytes(path: str | Path, what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file within the size limit, opened without blocking on a FIFO."""
    limit = limits().text_bytes if max_bytes is None else max_bytes
    check_regular(path, what, limit)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise RobustlabError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced since the check
            raise RobustlabError(f"{what} {path} is not a regular file; refusing to read it")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise RobustlabError(f"{what} {path} grew beyond the limit of {size_text(limit)}")
    return data


def read_regular_text(path: str | Path, what: str, max_bytes: int | None = None) -> str:
    """The UTF-8 text of a regular file within the size limit, or a clear error."""
    data = read_regular_bytes(path, what, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RobustlabError(f"{what} {path} is not UTF-8 text") from None


# -- writing ------------------------------------------------------------------------------


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; moved onto it when the block succeeds, removed if not."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write(path: str | Path, writer: Callable[[Path], object]) -> None:
    """Let ``writer`` write a temporary file, then move it onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _stamped(obj: Any) -> Any:
    """A record (or each record of a list) with the robustlab marker key added if absent."""
    if isinstance(obj, dict):
        return {JSON_MARKER: __version__, **obj}
    if isinstance(obj, list) and obj and all(isinstance(row, dict) for row in obj):
        return [{JSON_MARKER: __version__, **row} for row in obj]
    return obj


def json_text(obj: Any) -> str:
    """The JSON text robustlab writes for a record: sorted, indented, marked as robustlab's."""
    return json.dumps(_stamped(obj), indent=2, sort_keys=True) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    """Write a record as marked JSON, atomically (every JSON output goes through this)."""
    atomic_write_text(path, json_text(obj))


def read_head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of a regular file (empty if it cannot be read)."""
    try:
        check_regular(path, "file")
        with open(path, "rb") as f:
            return f.read(n)
    except (OSError, RobustlabError):
        return b""


def is_robustlab_json(path: Path) -> bool:
    """Whether a file is a JSON record robustlab wrote (it carries the marker key); the
    manifest of a checkpoint folder is part of that checkpoint, not a record."""
    try:
        obj = json.loads(read_regular_bytes(path, "file"))
    except (RobustlabError, ValueError):
        return False
    if isinstance(obj, dict):
        in_checkpoint = obj.get("format") == "robustlab-checkpoint" and any(
            p.suffix == ".safetensors" for p in path.parent.iterdir()
        )
        return JSON_MARKER in obj and not in_checkpoint  # a checkpoint is no record to replace
    return (
        isinstance(obj, list)
        and bool(obj)
        and all(isinstance(row, dict) and JSON_MARKER in row for row in obj)
    )


def starts_with(prefix: bytes) -> Callable[[Path], bool]:
    """A recogniser for files robustlab writes with a fixed first line (a CSV header)."""

    def recognise(path: Path) -> bool:
        """Whether the file begins with the prefix."""
        return read_head(path, len(prefix)) == prefix

    return recognise


def npz_with_keys(keys: Iterable[str]) -> Callable[[Path], bool]:
    """A recogniser for .npz archives robustlab writes: exactly these arrays."""
    wanted = {f"{k}.npy" for k in keys}

    def recognise(path: Path) -> bool:
        """Whether the archive holds exactly the wanted arrays."""
        if not read_head(path, 4).startswith(b"PK"):
            return False
        try:
            with zipfile.ZipFile(path) as z:
                return set(z.namelist()) == wanted
        except (OSError, zipfile.BadZipFile):
            return False

    return recognise


# -- checking outputs before any work -------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """A path a command will write, how to recognise a file robustlab wrote there, and how."""

    path: Path
    option: str  # the command-line option that named it ("--json"), for messages
    ours: Callable[[Path], bool] | None = None  # None: only a new file may be written here
    appends: bool = False  # written into (a results store), not replaced
    folder: bool = False  # a folder the command fills; its files are listed as outputs too
    keep: str | None = None  # what the file is when even robustlab's own is kept (say "a
    # trained checkpoint's manifest"): it is replaced only with --overwrite

    def __post_init__(self) -> None:
        """Accept a str path."""
        object.__setattr__(self, "path", Path(self.path).expanduser())


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing path, following links; None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _input_files(inputs: Iterable[str | Path | None]) -> dict[tuple[int, int], Path]:
    """Every file the command reads, by identity: input files and the files in input folders."""
    found: dict[tuple[int, int], Path] = {}
    for item in inputs:
        if item is None:
            continue
        root = Path(item).expanduser()
        ident = _identity(root)
        if ident is None:
            continue
        found[ident] = root
        if root.is_dir():
            for folder, _, names in os.walk(root):
                for name in names:
                    p = Path(folder, name)
                    sub = _identity(p)
                    if sub is not None:
                        found[sub] = p
    return found


def _check_place(out: Output) -> None:
    """The output's folder exists (or can be made) and can be written."""
    path = out.path
    parent = path if out.folder else path.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():
            raise RobustlabError(f"{out.option} {path}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise RobustlabError(
            f"{out.option} {path} cannot be written: {parent} is a file, not a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RobustlabError(
            f"{out.option} {path} cannot be written: no permission to write in {parent}"
        )


def _check_one(out: Output, inputs: dict[tuple[int, int], Path], overwrite: bool) -> None:
    """Refuse one output that would lose or corrupt a file (see check_outputs)."""
    path = out.path
    if out.folder:
        if path.exists() and not path.is_dir():
            raise RobustlabError(f"{out.option} {path} names a file; it must be a folder")
        _check_place(out)
        return
    if path.is_dir():
        raise RobustlabError(f"{out.option} {path} is a folder; give a file name")
    if path.is_symlink() and not path.exists():
        raise RobustlabError(f"{out.option} {path} is a broken link; refusing to write through it")
    ident = _identity(path)
    if ident is not None and ident in inputs:
        raise RobustlabError(
            f"{out.option} {path} is the same file as the input {inputs[ident]}; "
            "robustlab never writes over a file it reads"
        )
    _check_place(out)
    if ident is None:
        return
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise RobustlabError(f"{out.option} {path} exists and is not a regular file")
    if out.appends and not os.access(path, os.W_OK):
        raise RobustlabError(f"{out.option} {path} cannot be written: no permission")
    if out.ours is not None and out.ours(path):
        if out.keep and not overwrite:
            raise RobustlabError(
                f"{out.option} {path} is {out.keep}; pass --overwrite to replace it, "
                "or choose another name"
            )
        return
    if out.appends:
        raise RobustlabError(
            f"{out.option} {path} exists and is not one robustlab wrote; refusing to write into it"
        )
    if not overwrite:
        raise RobustlabError(
            f"{out.option} {path} exists and was not written by robustlab; "
            "pass --overwrite to replace it, or choose another name"
        )


def check_outputs(
    outputs: Iterable[Output | None],
    inputs: Iterable[str | Path | None] = (),
    *,
    overwrite: bool = False,
) -> list[Output]:
    """Check every output of a command before it starts any work; one sentence per problem.

    Refused: an output that is a folder (or a folder output that is a file), that lies where
    nothing can be written, that is the same file as any input (or any file inside an input
    folder, through links), an output named twice, and an existing file robustlab did not
    write (recognised by ``Output.ours``) unless ``overwrite``. Inputs are refused even with
    ``overwrite``; a results store (``appends``) is only ever written into if it is robustlab's.
    """
    wanted = [o for o in outputs if o is not None]
    read = _input_files(inputs)
    seen: dict[Path, Output] = {}
    for out in wanted:
        key = Path(os.path.abspath(out.path))
        twice = seen.get(key)
        if twice is not None and not (twice.folder and out.folder):
            raise RobustlabError(
                f"{out.option} and {twice.option} both name {out.path}; give each its own file"
            )
        seen[key] = out
        _check_one(out, read, overwrite)
    return wanted


@contextmanager
def resume_state(path: str | Path | None) -> Iterator[Path | None]:
    """Resume state for the block: removed when the block finished (after every output was
    written), kept when it failed or was interrupted, so a run started again resumes."""
    p = None if path is None else Path(path)
    yield p
    if p is not None:
        p.unlink(missing_ok=True)
