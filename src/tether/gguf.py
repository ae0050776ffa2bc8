"""GGUF model files: loading one as an ordinary (dense, trainable, saveable) Hugging Face model, and converting
one once into a model folder (config, safetensors weights, tokenizer, chat template, generation config).

A path ending in `.gguf` is loaded with transformers' GGUF support (`from_pretrained(folder, gguf_file=name)`,
which needs the `gguf` package: `pip install "tether[gguf]"`), for the model and for the tokenizer. Quantized
tensors are dequantized at load time (`GgufConfig(dequantize=True)`): the model is then a plain model in the
requested dtype with no quantization config, so `save_pretrained` (tether's final save and checkpoints) writes
an ordinary safetensors folder. Dequantizing is slow (about 20 s for SmolLM2-135M on 2 CPU cores): convert
a file once (`tether convert-gguf FILE OUT_DIR`) and point runs at the folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

GGUF_SUFFIX = ".gguf"
_MAGIC = b"GGUF"
_REQUIRED_KEYS = ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.tokens")
# What `convert` writes besides the *.safetensors weights; with them, a complete conversion.
FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


class GGUFError(ValueError):
    """A .gguf path that cannot be loaded: missing, not GGUF, truncated, or without model/tokenizer metadata."""


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """True if `path` names a GGUF file (by its suffix; whether it is a valid one is `check_gguf`'s job)."""
    return str(path).lower().endswith(GGUF_SUFFIX)


def check_gguf(path: str | os.PathLike[str]) -> None:
    """Raise GGUFError naming `path` and the fix unless it is a readable GGUF file with model and tokenizer
    metadata (reads the header and tensor index only; no tensor data is dequantized)."""
    file = Path(path)
    if not file.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {_MAGIC!r})")
    try:
        import gguf
    except ImportError as exc:
        raise GGUFError(
            f"{path}: reading .gguf files needs the gguf package: pip install 'tether[gguf]'"
        ) from exc
    try:
        fields = gguf.GGUFReader(file).fields
    except Exception as exc:  # the reader raises ValueError, IndexError, ... on a truncated or corrupt file
        raise GGUFError(f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from exc
    missing = [key for key in _REQUIRED_KEYS if key not in fields]
    if missing:
        raise GGUFError(f"{path}: the GGUF metadata lacks {missing}: not a model file with a tokenizer")


def pretrained_source(path: str | os.PathLike[str], *, model: bool) -> tuple[str, dict[str, Any]]:
    """(name_or_path, extra keyword arguments) for `from_pretrained` of `path`: a folder passes through; a
    `.gguf` file becomes its folder plus `gguf_file=` (and, for a model, `quantization_config` asking for a
    dequantized, plain model)."""
    if not is_gguf(path):
        return str(path), {}
    file = Path(path)
    kwargs: dict[str, Any] = {"gguf_file": file.name}
    if model:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return str(file.parent), kwargs


def load(path: str | os.PathLike[str], dtype: torch.dtype | None = None):
    """(model, tokenizer) of a GGUF file: a dense causal LM in `dtype` (default float32; weights dequantized)
    and its tokenizer with the file's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    folder, kwargs = pretrained_source(path, model=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    folder, kwargs = pretrained_source(path, model=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, **kwargs)
    return model, tokenizer


def save_folder(model, tokenizer, out_dir: str | os.PathLike[str]) -> Path:
    """Write model (safetensors, config, generation config) and tokenizer (with its chat template) into
    out_dir, all or nothing: they go to a staging folder renamed to out_dir when complete. out_dir must not
    exist or be empty."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: remove it or choose another folder")
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, out)
        except OSError as exc:  # out was filled meanwhile (another process saving the same folder)
            raise FileExistsError(f"{out} was written by someone else meanwhile") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def convert(
    path: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> Path:
    """Convert a GGUF file once into a Hugging Face model folder that later runs load in seconds."""
    model, tokenizer = load(path, dtype)
    return save_folder(model, tokenizer, out_dir)


def is_complete(folder: str | os.PathLike[str]) -> bool:
    """True if `folder` holds every file `convert` writes (`save_folder` renames a folder into place whole)."""
    folder = Path(folder)
    return all((folder / name).is_file() for name in FOLDER_FILES) and any(folder.glob("*.safetensors"))
