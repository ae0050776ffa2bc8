"""Where models and data come from: local paths, Hugging Face Hub ids (through the hub library's cache) and
PEFT adapter folders.

A string that names an existing local file or folder is always that path. Any other string of the form
`org/name` (no file suffix tether reads, like `.jsonl` or `.gguf`) is a Hub id: `snapshot` resolves it with
`huggingface_hub.snapshot_download` to the folder of one commit in the hub cache (HF_HUB_CACHE, by default
~/.cache/huggingface/hub), the same cache transformers and datasets use. With HF_HUB_OFFLINE=1 only the cache
is read; online, missing files are downloaded (for a model: its config, tokenizer and safetensors files).
Everything downstream reads that snapshot folder as a local one, so a Hub model is checked and loaded exactly
like a local folder, and a Hub data set is read like a local folder of data files (`datasets.load_dataset`
on the folder: `datasets.load_dataset(id)` itself cannot read the hub cache offline, it only looks for data
sets it has prepared before). A run's fingerprint and the reference cache name a Hub model or data set by
`identity`: `hub:org/name@<commit>`, never by the cache path.

When an id is neither cached nor reachable, `HubError` says so and how to point at a local copy.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tether.config import ModelConfig

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Suffixes of files tether reads: a missing `data/train.jsonl` is a missing file, not a Hub id.
FILE_SUFFIXES = (".gguf", ".jsonl", ".json", ".parquet", ".pq", ".csv", ".safetensors", ".yaml", ".yml")
# What a model snapshot needs (config, tokenizer, chat template, safetensors weights, adapter config); online,
# only these are downloaded (no pickle weights, no ONNX or GGUF copies).
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class HubError(ValueError):
    """A Hub id that cannot be resolved: not in the cache and the Hub not reachable, or not on the Hub."""


@dataclass(frozen=True)
class Snapshot:
    """One commit of a Hub repository in the local cache."""

    repo_id: str
    repo_type: str  # model | dataset
    commit: str  # the snapshot folder's name: the commit hash
    folder: Path

    @property
    def identity(self) -> str:
        return f"hub:{self.repo_id}@{self.commit}"


def is_hub_id(name: str | os.PathLike[str] | None) -> bool:
    """True for `org/name` that is not an existing local path and has no file suffix tether reads."""
    if not name:
        return False
    text = str(name)
    return bool(HUB_ID.match(text)) and not text.lower().endswith(FILE_SUFFIXES) and not Path(text).exists()


_RESOLVED: dict[tuple[str, str, str | None, str, bool], Snapshot] = {}


def snapshot(repo_id: str, repo_type: str = "model", revision: str | None = None) -> Snapshot:
    """The cached snapshot of `repo_id` at `revision` (default: the main branch), downloaded first when the Hub
    is reachable and HF_HUB_OFFLINE is not set. Resolved once per process (a run reads one commit throughout)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    key = (repo_type, repo_id, revision, str(constants.HF_HUB_CACHE), offline)
    if key in _RESOLVED:
        return _RESOLVED[key]
    try:
        folder = snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            local_files_only=offline,
            allow_patterns=MODEL_FILES if repo_type == "model" else None,
        )
    except LocalEntryNotFoundError:
        raise HubError(_not_cached(repo_id, repo_type, revision, offline)) from None
    except HfHubHTTPError as exc:  # online: no such repository or revision, or access refused
        raise HubError(
            f"{_what(repo_id, repo_type, revision)}: the Hub refused it ({type(exc).__name__}: {exc})"
        ) from None
    found = Snapshot(repo_id, repo_type, Path(folder).name, Path(folder))
    _RESOLVED[key] = found
    return found


def _what(repo_id: str, repo_type: str, revision: str | None) -> str:
    kind = "data set" if repo_type == "dataset" else "model"
    return f"Hub {kind} {repo_id!r}" + (f" at revision {revision!r}" if revision else "")


def _not_cached(repo_id: str, repo_type: str, revision: str | None, offline: bool) -> str:
    from huggingface_hub import constants

    why = (
        "this machine is offline (HF_HUB_OFFLINE=1)"
        if offline
        else "the Hub cannot be reached from this machine (offline?)"
    )
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    rev = f" --revision {revision}" if revision else ""
    local = (
        "a folder of data files or a single .jsonl/.parquet/.csv file"
        if repo_type == "dataset"
        else "a folder with config.json, *.safetensors and the tokenizer"
    )
    return (
        f"{_what(repo_id, repo_type, revision)} is not a local path and is not in the Hugging Face cache"
        f" ({constants.HF_HUB_CACHE}), and {why}. Point the field at a local copy instead: {local}"
        f" (`hf download {repo_id}{flag}{rev} --local-dir DIR` where the Hub is reachable, then copy DIR"
        " here), or set HF_HUB_CACHE to a cache that holds it"
    )


def local_path(name: str, revision: str | None = None, repo_type: str = "model") -> str:
    """`name` itself, or the cached snapshot folder when it is a Hub id (see `snapshot`)."""
    return str(snapshot(name, repo_type, revision).folder) if is_hub_id(name) else str(name)


def identity(name: str | None, revision: str | None = None, repo_type: str = "model") -> str | None:
    """How fingerprints and cache keys name a source: `hub:org/name@<commit>` for a Hub id, else the resolved
    local path (None for none)."""
    if not name:
        return None
    if is_hub_id(name):
        return snapshot(name, repo_type, revision).identity
    return str(Path(name).resolve())


# --- PEFT adapter folders ----------------------------------------------------------------------------------


def is_adapter(folder: str | os.PathLike[str]) -> bool:
    """A PEFT adapter folder: adapter_config.json and no config.json of a full model."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base(adapter: str, revision: str | None = None) -> tuple[str, str | None]:
    """(base model path or Hub id, its revision) that the adapter at `adapter` (a folder or Hub id) was
    trained on, from its adapter_config.json (`base_model_name_or_path`, `revision`)."""
    folder = Path(local_path(adapter, revision))
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise HubError(
            f"{adapter}: {ADAPTER_CONFIG} names no base_model_name_or_path; set model.path to the base model"
        )
    if not Path(base).exists() and (folder / base).exists():
        base = str(folder / base)  # a base named relative to the adapter folder
    return str(base), config.get("revision")


def base_model(model: ModelConfig) -> tuple[str, str | None]:
    """(path or Hub id, revision) of the model whose weights are loaded: model.path, or the base named by the
    adapter's adapter_config.json when model.path is empty."""
    if model.path or model.adapter is None:
        return model.path, model.revision
    return adapter_base(model.adapter)


def tokenizer_source(model: ModelConfig) -> tuple[str, str | None]:
    """(path or Hub id, revision) of the tokenizer: model.tokenizer_path; else the adapter folder when it
    holds a tokenizer (tether's and TRL's adapter checkpoints do); else the base model's."""
    if model.tokenizer_path:
        return model.tokenizer_path, None
    if model.adapter is not None:
        folder = Path(local_path(model.adapter))
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return model.adapter, None
    return base_model(model)
