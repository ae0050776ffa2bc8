"""Security edges: no remote code unless asked, safetensors only, and contained program execution.

Promise (DESIGN.md section 4, modeling.py, evaluate/execution.py): `trust_remote_code` is off unless set; a
model folder's own Python (config.json `auto_map`) is never imported then; weights load from safetensors only,
so a pickle is never unpickled; evaluated programs run in a child process with wall-clock, CPU, memory, file
and process limits and without network. The sandbox checks here are the reliability-level summary; the
detailed ones are tests/test_sandbox.py. Kernel-level checks adapt to `sandbox_report()` (they need root for
the user drop and a kernel that allows network namespaces); the Python-level guard is checked everywhere.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import transformers

from tether import cli
from tether.config import ModelConfig, TrainConfig
from tether.evaluate.execution import SandboxConfig, run_program, sandbox_report
from tether.modeling import load_causal_lm, load_tokenizer

# --- remote code ------------------------------------------------------------------------------------------

EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil_custom"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _folder_with_remote_code(model_dir: Path, dest: Path, marker: Path, model_type: str) -> Path:
    """A copy of the tiny model whose config and tokenizer config point at evil_code.py via auto_map."""
    shutil.copytree(model_dir, dest)
    (dest / "evil_code.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = json.loads((dest / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}
    (dest / "config.json").write_text(json.dumps(config))
    tok = json.loads((dest / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "evil_code.EvilTokenizer"]}
    (dest / "tokenizer_config.json").write_text(json.dumps(tok))
    return dest


def test_trust_remote_code_and_safetensors_are_what_loading_asks_for(model_dir, monkeypatch):
    assert TrainConfig().model.trust_remote_code is False
    seen: dict[str, dict] = {}
    real_model = transformers.AutoModelForCausalLM.from_pretrained.__func__
    real_tok = transformers.AutoTokenizer.from_pretrained.__func__

    def spy(name, real):
        def from_pretrained(cls, *args, **kwargs):
            seen[name] = kwargs
            return real(cls, *args, **kwargs)

        return classmethod(from_pretrained)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy("model", real_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy("tokenizer", real_tok))
    load_causal_lm(str(model_dir), ModelConfig(path=str(model_dir)))
    load_tokenizer(ModelConfig(path=str(model_dir)))
    assert seen["model"]["use_safetensors"] is True
    assert seen["model"]["trust_remote_code"] is False
    assert seen["tokenizer"]["trust_remote_code"] is False


@pytest.mark.parametrize("model_type", ["llama", "evil_custom"])
def test_remote_code_in_a_model_folder_is_never_run(
    model_dir, tmp_path, write_jsonl, write_config, good_rows, model_type
):
    """auto_map with a known model_type: tether's built-in class is used; with an unknown one: refused."""
    marker = tmp_path / "marker.txt"
    folder = _folder_with_remote_code(model_dir, tmp_path / "model", marker, model_type)
    data = write_jsonl(tmp_path / "train.jsonl", good_rows(4))
    config = write_config(tmp_path / "cfg.yaml", data, tmp_path / "run", model={"path": str(folder)})
    try:
        code = cli.main(["train", str(config), "optim.max_steps=1"])
    except Exception as exc:  # refused by transformers: fine, as long as nothing ran
        assert "trust_remote_code" in str(exc), exc
        code = None
    assert not marker.exists(), "the model folder's own Python code was executed"
    if model_type == "llama":
        assert code == 0
        saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
        assert saved["architectures"] == ["LlamaForCausalLM"]
    else:
        assert code != 0


def test_remote_code_runs_only_when_asked(model_dir, tmp_path):
    """Positive control (shows the marker check above can fail): with trust_remote_code=true it does run."""
    marker = tmp_path / "marker.txt"
    folder = _folder_with_remote_code(model_dir, tmp_path / "model", marker, "llama")
    load_tokenizer(ModelConfig(path=str(folder), trust_remote_code=True))
    assert marker.read_text() == "remote code ran"


class _WritesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_pickle_weights_are_never_unpickled(model_dir, tmp_path):
    """Even when validation is bypassed, load_causal_lm refuses a folder whose only weights are a pickle."""
    marker = tmp_path / "marker.txt"
    folder = tmp_path / "bin_only"
    shutil.copytree(model_dir, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(
        pickle.dumps({"model.embed_tokens.weight": _WritesMarker(marker)})
    )
    with pytest.raises(Exception):  # noqa: B017 - transformers' error type is not part of the promise
        load_causal_lm(str(folder), ModelConfig(path=str(folder)))
    assert not marker.exists()


# --- program execution ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report():
    return sandbox_report(SandboxConfig(timeout_s=20))


def _run(program: str, **limits) -> object:
    return run_program(textwrap.dedent(program), SandboxConfig(**{"timeout_s": 5, **limits}))


def test_sandbox_runs_in_a_separate_limited_process(report):
    result = _run(
        """
        import os, resource
        print(os.getpid(), resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_CPU)[0])
        """,
        memory_bytes=1 << 30,
    )
    assert result.passed, result.reason
    pid, mem, cpu = map(int, result.stdout.split())
    assert pid != os.getpid() and mem == 1 << 30 and cpu == 6  # ceil(timeout) + 1


@pytest.mark.parametrize(
    "body", ["while True:\n    pass", "import time\nwhile True:\n    time.sleep(1)"], ids=["busy", "sleeping"]
)
def test_sandbox_infinite_loop_is_stopped(body):
    result = _run(body, timeout_s=2)
    assert result.status == "timeout" or (result.status == "failed" and "CPU" in result.reason)
    assert result.duration_s < 10


def test_sandbox_memory_limit():
    result = _run("x = bytearray(1 << 30)\nprint('allocated')", memory_bytes=256 << 20)
    assert result.status == "failed" and "MemoryError" in result.reason
    assert "allocated" not in result.stdout


def _alive(pids: list[int], wait_s: float = 5.0) -> list[int]:
    """The pids still running the sandboxed program (zombies count as dead), after up to wait_s for SIGKILL."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if "\nState:\tZ" not in status and b"program.py" in cmdline:
                alive.append(pid)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# A bounded fork bomb: at most 40 children, each sleeping 60 s; the parent exits at once.
FORK_BOMB = """
import os, time
made = 0
for _ in range(40):
    try:
        pid = os.fork()
    except Exception as exc:
        print("refused", type(exc).__name__, flush=True)
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    made += 1
    print("child", pid, flush=True)
print("made", made, flush=True)
"""


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel"])
def test_sandbox_fork_bomb_is_bounded_and_cleaned_up(report, guard):
    if not guard and not report["nproc_enforced"]:
        pytest.skip("RLIMIT_NPROC is not enforced here (runs as root without a user to drop to)")
    result = _run(FORK_BOMB, guard=guard, max_processes=8)
    lines = result.stdout.split("\n")
    children = [int(line.split()[1]) for line in lines if line.startswith("child ")]
    assert "refused" in result.stdout
    assert len(children) < 8
    assert _alive(children) == [], "forked children outlived the sandbox"


@pytest.fixture
def world_writable():
    """A fresh folder under the system tmp that any user may write to (removed afterwards)."""
    folder = Path(tempfile.mkdtemp(prefix="tether-reliability-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_sandbox_write_outside_its_folder_does_not_land(report, tmp_path, world_writable):
    # Writable by the sandbox user too, so in the first run only the sandbox's guard can stop the write.
    target = world_writable / "escaped.txt"
    program = f"""
        for attempt in ("open", "os.open"):
            try:
                if attempt == "open":
                    open({str(target)!r}, "w").write("x")
                else:
                    import os
                    os.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))
                print(attempt, "wrote")
            except OSError as exc:
                print(attempt, "refused", type(exc).__name__)
        """
    result = _run(program)
    assert result.stdout.count("refused") == 2 and not target.exists(), result.stdout
    # With the Python guard off, the kernel still protects the evaluator's own files (sandbox user != owner).
    private = tmp_path / "private"
    private.mkdir(mode=0o755)
    if report["file_permissions"]:
        result = _run(program.replace(str(target), str(private / "escaped.txt")), guard=False)
        assert result.stdout.count("refused") == 2 and not (private / "escaped.txt").exists(), result.stdout


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "namespace"])
def test_sandbox_socket_connect_fails(report, listener, guard):
    if not guard and not report["network_namespace"]:
        pytest.skip("no network namespace on this kernel: only the Python guard stops sockets here")
    port = listener.getsockname()[1]
    program = f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"leak")
            print("connected")
        except OSError as exc:
            print("refused", type(exc).__name__)
        """
    result = _run(program, guard=guard)
    assert "refused" in result.stdout and "connected" not in result.stdout, result.stdout
    with pytest.raises(TimeoutError):
        listener.accept()


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "landlock"])
def test_sandbox_guard_bypass_cannot_write_to_shared_tmp(report, world_writable, guard):
    """posix.open bypasses the Python guard; the kernel (Landlock) must still refuse a write into a folder the
    sandbox user may write to (world-writable, like /tmp). Skipped only where the kernel has no Landlock."""
    if not report["write_confinement"]:
        pytest.skip("no Landlock on this kernel: writes to world-writable folders are not confined")
    target = world_writable / "escaped.txt"
    program = f"""
        import os, posix
        fd = posix.open({str(target)!r}, os.O_WRONLY | os.O_CREAT, 0o644)
        posix.write(fd, b"escaped")
        posix.close(fd)
        """
    _run(program, guard=guard)
    assert not target.exists(), "a sandboxed program wrote outside its folder"


@pytest.fixture
def unix_listener(world_writable):
    """A path-based UNIX stream socket, mode 0777, in a world-writable folder outside any sandbox, and a
    datagram one beside it: anyone on the machine may connect or send to them, unless a kernel filter stops it."""
    import socket

    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(world_writable / "stream.sock"))
    stream.listen(4)
    stream.settimeout(0.5)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(world_writable / "dgram.sock"))
    dgram.settimeout(0.5)
    for name in ("stream.sock", "dgram.sock"):
        (world_writable / name).chmod(0o777)
    yield stream, dgram
    stream.close()
    dgram.close()


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "seccomp"])
def test_sandbox_cannot_reach_a_unix_socket_outside(report, unix_listener, guard):
    """The network namespace does not cover AF_UNIX: a path-based socket is reached through the file system.
    `_socket.SocketType` is the class the Python guard does not replace, so only the seccomp filter stops it."""
    if not report["socket_filter"]:
        pytest.skip("no seccomp socket filter for this machine's architecture")
    stream, dgram = unix_listener
    program = f"""
        import _socket as m
        try:
            s = m.SocketType(m.AF_UNIX, m.SOCK_STREAM)
            s.connect({stream.getsockname()!r})
            s.sendall(b"leak")
            print("connected")
        except OSError as exc:
            print("refused", type(exc).__name__)
        try:
            a, b = m.socketpair(m.AF_UNIX, m.SOCK_DGRAM)  # a connected pair can still sendto() a path
            a.sendto(b"leak", {dgram.getsockname()!r})
            print("sent")
        except OSError as exc:
            print("refused", type(exc).__name__)
        """
    result = _run(program, guard=guard)
    assert result.stdout.split() == ["refused", "PermissionError"] * 2, (result.stdout, result.stderr)
    with pytest.raises(TimeoutError):
        stream.accept()
    with pytest.raises(TimeoutError):
        dgram.recv(16)


def test_sandbox_socket_filter_leaves_asyncio_working(report):
    """asyncio's event loop needs a stream socketpair (its self-pipe): the filter allows exactly that. (With
    the Python guard on, asyncio cannot even be imported: ssl subclasses the socket class the guard replaced.)"""
    result = _run("import asyncio\nasync def f():\n    return 6 * 7\nprint(asyncio.run(f()))", guard=False)
    assert result.passed and result.stdout.split() == ["42"], (result.reason, result.stderr)


def test_sandbox_working_folder_is_bounded_in_total(report):
    """RLIMIT_FSIZE bounds each file (16 MiB); the tmpfs working folder bounds all of them (64 MiB) and their
    number (4096): files under the per-file limit fill it, then writes fail with ENOSPC."""
    if not report["folder_bound"]:
        pytest.skip("no mount namespace here: only the per-file limit applies")
    program = """
        import errno, os
        written = 0
        try:
            for i in range(6):
                with open(f"big{i}", "wb") as f:
                    for _ in range(16):
                        written += f.write(b"x" * (1 << 20))
        except OSError as exc:
            print("bytes refused", errno.errorcode[exc.errno], written)
        made = 0
        try:
            for i in range(5000):
                open(f"empty{i}", "wb").close()
                made += 1
        except OSError as exc:
            print("files refused", errno.errorcode[exc.errno], made)
        """
    result = _run(program, timeout_s=30)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("bytes refused ENOSPC"), (result.stdout, result.stderr)
    assert 48 << 20 <= int(lines[0].split()[-1]) <= 64 << 20  # three 16 MiB files fit, the fourth does not
    assert lines[1].startswith("files refused ENOSPC") and int(lines[1].split()[-1]) < 4096


# Forks as fast as it can for 1.5 s (RLIMIT_NPROC refuses most); every process then sleeps 30 s at most.
FORK_BOMB_UNTIL = """
import posix, time
end = time.time() + 1.5
while time.time() < end:
    try:
        posix.fork()
    except OSError:
        pass
time.sleep(30)
"""


def test_sandbox_program_after_a_fork_bomb_starts_clean(report):
    """The killed bomb's orphans count against the sandbox user's RLIMIT_NPROC until init reaps them; the run
    waits for that, so the next program (which starts threads) is not refused."""
    if not report["nproc_enforced"]:
        pytest.skip("RLIMIT_NPROC is not enforced here (runs as root without a user to drop to)")
    bomb = _run(FORK_BOMB_UNTIL, guard=False, timeout_s=3)
    assert bomb.status == "timeout"
    threads = """
        import threading
        done = []
        workers = [threading.Thread(target=done.append, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        print(len(done))
        """
    after = _run(threads)
    assert after.passed and after.stdout.split() == ["4"], (after.reason, after.stderr)
