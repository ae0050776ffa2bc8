"""Fixtures of the reliability suite, on top of tests/conftest.py's (its `make_model` builds the model).

- `model_dir`: the toy character tokenizer and a 2-layer, hidden-32 Llama with 2 heads built from a seed and
  saved with safetensors (nothing is downloaded; every hub access is switched off for the session).
- `good_rows` / `write_jsonl` / `write_config`: preference pairs (short arithmetic prompts as text, each prompt
  4 tokens and each response 2 with <eos>) and YAML configs in a test's tmp_path.
- `runner`: subprocess helpers with a timeout on everything: a hung process group is SIGKILLed and the test
  fails with its output instead of hanging CI.
- `metrics`: a run's metrics.jsonl through `tether.train.read_metrics` (a torn line is an error here).
- `probes`: tests/reliability/_probes.py (NaN injection, pauses, rank reports), also runnable as a script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import tether.train
from tether.config import _merge

HERE = Path(__file__).resolve().parent
PROBES_SCRIPT = HERE / "_probes.py"

# Every subprocess gets these: offline, one thread per process (2 cores; reproducible CPU math), no buffering.
SUBPROCESS_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def _load_probes():
    spec = importlib.util.spec_from_file_location("tether_reliability_probes", PROBES_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def _offline(tmp_path_factory: pytest.TempPathFactory):
    """No hub access in this process, and a private HF cache (remote code would be copied there)."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(key, "1")
        mp.setenv("HF_HOME", str(hf_home))
        mp.delenv("ACCELERATE_USE_CPU", raising=False)
        yield


@pytest.fixture(autouse=True)
def _restore_determinism():
    """train() with optim.deterministic=true switches torch's global flag on; keep it from leaking."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="session")
def probes():
    return _load_probes()


@pytest.fixture(scope="session")
def tokenizer():
    from tether.toy.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, make_model) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny_llama"), seed=0, num_heads=2)


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n good pairs: prompt "a+b=" (4 tokens), chosen the sum, rejected the sum + 1 (one digit each)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)})
    return rows


@pytest.fixture(scope="session")
def good_rows():
    return make_rows


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One line per item: dicts as JSON, bytes written raw, str written as given (no newline needed)."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row.rstrip(b"\n") + b"\n")
            elif isinstance(row, str):
                f.write(row.rstrip("\n").encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(row).encode("utf-8") + b"\n")
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    return _write_jsonl


def base_config(model_dir: Path, data: Path, output_dir: Path) -> dict[str, Any]:
    """A tiny, fast run: constant LR (so a skipped step shifts no schedule), no progress bars."""
    return {
        "output_dir": str(output_dir),
        "model": {"path": str(model_dir)},
        "data": {"train": str(data), "max_length": 16, "max_prompt_length": 8},
        "objective": {"name": "dpo", "beta": 0.1},
        "optim": {
            "lr": 0.01,
            "batch_size": 2,
            "grad_accum": 1,
            "max_steps": 4,
            "seed": 0,
            "scheduler": "constant",
        },
        "checkpoint": {"every": 0, "keep_last": 2},
        "logging": {"progress": False},
    }


@pytest.fixture(scope="session")
def write_config(model_dir: Path):
    """write_config(path, train_file, output_dir, **sections) -> path of a YAML config (sections deep-merged)."""

    def write(path: Path, train_file: Path, output_dir: Path, **sections: Any) -> Path:
        cfg = _merge(base_config(model_dir, train_file, output_dir), sections)  # the config loader's merge
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return write


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (`path`), read by tether's reader; its warning about a torn last
    line is an error here."""
    path = Path(path)
    assert path.name == "metrics.jsonl", path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return tether.train.read_metrics(path.parent)


@pytest.fixture(scope="session")
def metrics():
    return read_metrics


# --- subprocesses ----------------------------------------------------------------------------------------


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class Runner:
    """Starts tether in subprocesses (own process group), with a timeout on every wait."""

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, **SUBPROCESS_ENV}
        env.pop("ACCELERATE_USE_CPU", None)  # launch as a user would: plain torchrun, nothing else set
        env.update(extra or {})
        return env

    def command(self, args: list[str], *, probes: bool = False, nproc: int = 1) -> list[str]:
        entry = [str(PROBES_SCRIPT)] if probes else ["-m", "tether.cli"]
        if nproc == 1:
            return [sys.executable, *entry, *args]
        # torchrun; --standalone picks a free rendezvous port (parallel CI jobs do not collide).
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *(entry if probes else ["-m", "tether.cli"]),
            *args,
        ]

    def start(
        self, cmd: list[str], log_dir: Path, extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log_dir.mkdir(parents=True, exist_ok=True)
        out = open(log_dir / "stdout.txt", "wb")  # noqa: SIM115 - closed in wait()/kill()
        err = open(log_dir / "stderr.txt", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=self.env(extra_env),
            start_new_session=True,
        )
        proc._reliability_logs = (log_dir, out, err)  # type: ignore[attr-defined]
        proc._reliability_t0 = time.monotonic()  # type: ignore[attr-defined]
        return proc

    def kill(self, proc: subprocess.Popen) -> Finished:
        """SIGKILL the process group this test started (the process and anything it spawned)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)
        return self._close(proc)

    def _close(self, proc: subprocess.Popen) -> Finished:
        log_dir, out, err = proc._reliability_logs  # type: ignore[attr-defined]
        out.close()
        err.close()
        return Finished(
            proc.returncode,
            (log_dir / "stdout.txt").read_text(errors="replace"),
            (log_dir / "stderr.txt").read_text(errors="replace"),
            time.monotonic() - proc._reliability_t0,  # type: ignore[attr-defined]
        )

    def wait(self, proc: subprocess.Popen, timeout: float) -> Finished:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            done = self.kill(proc)
            pytest.fail(
                f"process hung for more than {timeout} s and was killed: {proc.args}\n"
                f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
            )
        # A launcher may leave children behind when it fails; never let them outlive the test.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self._close(proc)

    def run(
        self,
        args: list[str],
        log_dir: Path,
        *,
        timeout: float = 180,
        probes: bool = False,
        nproc: int = 1,
        env: dict[str, str] | None = None,
    ) -> Finished:
        proc = self.start(self.command(args, probes=probes, nproc=nproc), log_dir, env)
        return self.wait(proc, timeout)


@pytest.fixture(scope="session")
def runner() -> Runner:
    return Runner()


def wait_for(predicate, proc: subprocess.Popen, timeout: float, poll: float = 0.001) -> bool:
    """Poll `predicate()` until it holds (True), the process exits (False) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return bool(predicate())
        time.sleep(poll)
    return False


@pytest.fixture(scope="session")
def poll_until():
    return wait_for
