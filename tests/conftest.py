"""Shared fixtures: a tiny Llama saved to a local folder, preference pairs in a JSONL file, and configs.

Everything is built here from a seed, nothing is downloaded. The model is tether's toy character-level
tokenizer with a 2-layer, hidden-32 Llama (about 24k parameters); the pairs are short arithmetic prompts in
TRL's conversational format (one JSON object per line, so dataset index i is JSONL line i + 1).

Helpers are handed out as fixtures (`make_model`, `make_pairs`, `train_yaml`), not imported: another
conftest.py in a subfolder would shadow `import conftest`.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}


def save_tiny_model(folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """A freshly initialized tiny Llama and the toy tokenizer, saved (safetensors) to `folder`."""
    from tether.toy.model import build_tiny_llama
    from tether.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, seed=seed, **{**TINY_MODEL, **overrides})
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """n preference pairs "a+b=" -> the sum (chosen) vs a wrong sum (rejected), conversational format."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            wrong = a + b + rng.choice([-11, -2, -1, 1, 3, 10, 100])
            rejected = f"{wrong} ok"[: rng.randint(1, 6)]  # responses of 1 to 6 tokens
            if rejected == str(a + b):  # a cut-off prefix can spell the right answer: no preference then
                rejected = str(wrong)
            row = {
                "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                "chosen": [{"role": "assistant", "content": str(a + b)}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local model folder (config.json, model.safetensors, tokenizer). Treat it as read-only."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """24 preference pairs in a JSONL file. Treat it as read-only."""
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 24)


@pytest.fixture(scope="session")
def make_model():
    """save_tiny_model(folder, seed=0, **config overrides) -> folder."""
    return save_tiny_model


@pytest.fixture(scope="session")
def make_pairs():
    """write_pairs(path, n, seed=0) -> path."""
    return write_pairs


@pytest.fixture(scope="session")
def config_dict():
    """base_config(model_dir, pairs, output_dir, **sections) -> the config as a dict (for module-scoped runs)."""
    return base_config


def base_config(model_dir: Path, pairs: Path, output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small, fast training config as a dict (the YAML layout); `sections` update its sections."""
    config: dict[str, Any] = {
        "output_dir": str(output_dir),
        "model": {"path": str(model_dir)},
        "data": {"train": str(pairs), "max_length": 64, "max_prompt_length": 32},
        "objective": {"name": "dpo", "beta": 0.1},
        "optim": {"lr": 1e-3, "batch_size": 4, "max_steps": 3, "scheduler": "constant", "seed": 0},
        "logging": {"progress": False},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


@pytest.fixture
def train_yaml(tmp_path, tiny_model_dir, pairs_file):
    """train_yaml(name="run", model=None, pairs=None, **sections) -> tmp_path/<name>.yaml.

    The config trains the tiny model (or `model`) on the 24 pairs (or `pairs`) into tmp_path/<name>:
    dpo, beta 0.1, lr 1e-3 constant, batch 4, 3 steps, no progress bars; `sections` update its sections,
    e.g. optim={"max_steps": 10}.
    """

    def write(name: str = "run", model: Path | None = None, pairs: Path | None = None, **sections) -> Path:
        config = base_config(model or tiny_model_dir, pairs or pairs_file, tmp_path / name, **sections)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="module")
def single_thread():
    """Run torch on one intra-op thread (opt in: `pytestmark = pytest.mark.usefixtures("single_thread")`).

    The tiny models' matmuls are microseconds: extra threads only add overhead, and on a loaded 2-core machine
    their spin-waits make a training step ~100x slower.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a TCP port free on 127.0.0.1 right now (for a multi-process rendezvous)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture
def listener():
    """A TCP server listening on 127.0.0.1 (accept times out after 0.5 s): the sandbox must not reach it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    yield server
    server.close()
