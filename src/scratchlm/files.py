"""Files written safely and read with clear errors: the bottom of the package, used by every other part.

Every write goes to a temporary name beside the destination and is renamed into place when complete, so
a crash, a full disk or Ctrl-C never leaves a half-written file (``os.replace`` is atomic on POSIX and
Windows). Readers turn missing or malformed files into one-line ``ModelFileError`` messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scratchlm.errors import ConfigError, ModelFileError, ScratchLMError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give the finished file the mode open() would have.
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, or a ModelFileError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from None


# A directory holding one of these is one of our outputs (an HF or scratchlm model, a tokenizer, the heat maps and
# page of `explain --attention`): --force may replace it. Any other non-empty directory might be the user's own
# folder, so it is never replaced.
OUTPUT_MARKERS = ("config.json", "model_config.json", "tokenizer.json", "attention.html")


def check_destination(path: Path, force: bool, want_dir: bool) -> None:
    """Refuse to overwrite without ``force``, and never replace a file by a directory or the reverse."""
    if not path.exists() and not path.is_symlink():
        return
    kind = "directory" if path.is_dir() else "file"
    if not force:
        raise ConfigError(f"{path} already exists; pass --force to replace it")
    if want_dir != path.is_dir():
        raise ConfigError(f"{path} is a {kind}; the export would write a {'directory' if want_dir else 'file'} "
                          "there: choose another --out")
    if want_dir and any(path.iterdir()) and not any((path / m).is_file() for m in OUTPUT_MARKERS):
        raise ConfigError(f"{path} is a directory that does not hold a model or tokenizer (no "
                          f"{' / '.join(OUTPUT_MARKERS)}); refusing to replace it even with --force: "
                          "choose another --out")


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parents of ``path``; returns them, deepest first, for cleanup after a failure."""
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()  # only succeeds when empty


def _umask_mode(base: int) -> int:
    """``base`` less the process umask: the mode a plain open() or mkdir() would give (mkstemp and mkdtemp
    make private 0600/0700 entries, which would surprise whoever shares an export)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _write_failed(path: Path, exc: OSError) -> ScratchLMError:
    return ScratchLMError(f"could not write {path}: {exc.strerror or exc}; nothing was written")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any failure it is deleted."""
    path = Path(path)
    check_destination(path, force, want_dir=False)
    created = _make_parents(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.chmod(_umask_mode(0o666))
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise _write_failed(path, exc) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces ``path``, on any failure it is deleted."""
    path = Path(path)
    check_destination(path, force, want_dir=True)
    created = _make_parents(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp.chmod(_umask_mode(0o777))
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():  # writers that go through mkstemp leave 0600 files
                f.chmod(_umask_mode(0o666))
        if path.exists():
            # Two renames: the old export stays whole until the new one is complete and in place.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "previous")
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / "previous", path)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise _write_failed(path, exc) from None
        raise
