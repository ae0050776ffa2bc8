"""Verifiers: does a completion solve its prompt? Each is a callable (prompt, completion) -> bool.

- `ExactMatch`: the completion equals the prompt's reference answer after `str.strip()` on both.
- a user-supplied callable, given as a callable or as a "module:function" string (`load_callable`).
- `ProgramVerifier`: builds a program from the prompt, the completion and test code and runs it in the
  sandbox (`tether.evaluate.execution`); passed when it exits with status 0. HumanEval layout:
  prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})".

A verifier may offer `verify_batch(prompts, completions) -> list[bool]` (ProgramVerifier runs its programs in
parallel); `verify_all` uses it when present.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tether.evaluate.execution import ExecutionResult, SandboxConfig, run_programs

VerifierFn = Callable[[str, str], bool]


def load_callable(spec: str | Callable[..., Any], what: str = "callable") -> Callable[..., Any]:
    """Resolve "package.module:function" (attributes may be dotted) or return a callable unchanged."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{what} must be a callable or a 'module:function' string, got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is not callable")
    return obj


class ExactMatch:
    """completion.strip() == answers[prompt].strip(); prompts without an answer raise KeyError."""

    def __init__(self, answers: Mapping[str, str]):
        self.answers = dict(answers)

    def __call__(self, prompt: str, completion: str) -> bool:
        return completion.strip() == str(self.answers[prompt]).strip()


def build_program(prompt: str, completion: str, test: str, entry_point: str | None = None) -> str:
    """HumanEval's check program when `entry_point` is given, else completion + test."""
    if entry_point:
        return f"{prompt}{completion}\n{test}\n\ncheck({entry_point})\n"
    return f"{completion}\n{test}\n"


class ProgramVerifier:
    """Runs each completion against its prompt's tests in the sandbox.

    Args:
        tests: prompt -> {"test": code, "entry_point": name or None}.
        config: sandbox limits.
        max_workers: sandboxes run at once by `verify_batch`.
    """

    def __init__(
        self,
        tests: Mapping[str, Mapping[str, Any]],
        config: SandboxConfig | None = None,
        max_workers: int = 4,
    ):
        self.tests = {p: dict(t) for p, t in tests.items()}
        self.config = config or SandboxConfig()
        self.max_workers = max_workers
        self.last_results: list[ExecutionResult] = []

    def _program(self, prompt: str, completion: str) -> str:
        spec = self.tests[prompt]
        return build_program(prompt, completion, spec["test"], spec.get("entry_point"))

    def check_batch(self, prompts: Sequence[str], completions: Sequence[str]) -> list[ExecutionResult]:
        programs = [self._program(p, c) for p, c in zip(prompts, completions, strict=True)]
        self.last_results = run_programs(programs, self.config, self.max_workers)
        return self.last_results

    def verify_batch(self, prompts: Sequence[str], completions: Sequence[str]) -> list[bool]:
        return [r.passed for r in self.check_batch(prompts, completions)]

    def __call__(self, prompt: str, completion: str) -> bool:
        return self.verify_batch([prompt], [completion])[0]


def verify_all(verifier: VerifierFn, prompts: Sequence[str], completions: Sequence[str]) -> list[bool]:
    """verifier over aligned (prompt, completion) pairs, batched when the verifier supports it."""
    if len(prompts) != len(completions):
        raise ValueError(f"verify_all: {len(prompts)} prompts but {len(completions)} completions")
    batch = getattr(verifier, "verify_batch", None)
    if batch is not None:
        return [bool(v) for v in batch(prompts, completions)]
    return [bool(verifier(p, c)) for p, c in zip(prompts, completions)]


def make_verifier(
    spec: str | VerifierFn,
    examples: Sequence[Mapping[str, Any]],
    sandbox: SandboxConfig | None = None,
    max_workers: int = 4,
) -> VerifierFn:
    """A verifier from a spec: "exact_match", "execution", "module:function" or a callable.

    Args:
        spec: what to build; "exact_match" needs an "answer" field in every example, "execution" a "test"
            field (and optionally "entry_point").
        examples: the prompt rows, each with at least "prompt".
    """
    if callable(spec):
        return spec
    if spec == "exact_match":
        missing = [i for i, ex in enumerate(examples) if "answer" not in ex]
        if missing:
            raise ValueError(f"verifier 'exact_match' needs an 'answer' field; rows {missing[:5]} have none")
        return ExactMatch({ex["prompt"]: str(ex["answer"]) for ex in examples})
    if spec == "execution":
        missing = [i for i, ex in enumerate(examples) if "test" not in ex]
        if missing:
            raise ValueError(f"verifier 'execution' needs a 'test' field; rows {missing[:5]} have none")
        tests = {ex["prompt"]: {"test": ex["test"], "entry_point": ex.get("entry_point")} for ex in examples}
        return ProgramVerifier(tests, sandbox, max_workers)
    return load_callable(spec, "verifier")
