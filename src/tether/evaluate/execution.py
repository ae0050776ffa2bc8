"""Run untrusted Python (a model's completion plus its tests) in a separate, limited process.

The evaluator never executes model code itself: every program runs in a fresh `python -I -B` child in its
own session, in a fresh temporary working directory, with a wall-clock timeout enforced by the parent.

What is enforced by the kernel (real), set in the child between fork and exec (`_Preexec`):
- resource limits with soft = hard, so the code cannot raise them: RLIMIT_AS (address space), RLIMIT_CPU
  (CPU seconds; SIGXCPU), RLIMIT_FSIZE (bytes per file written, stdout and stderr included; SIGXFSZ),
  RLIMIT_NOFILE (open descriptors), RLIMIT_CORE = 0, RLIMIT_NPROC (processes and threads of the user);
- no network: a new, empty network namespace (`unshare(CLONE_NEWNET)`; only a loopback that is down), when
  the kernel allows it (root, or unprivileged user namespaces); `sandbox_report()` says whether it took;
- no sockets at all: a seccomp filter refuses socket() of every family with EPERM (AF_UNIX included: a
  path-based UNIX socket outside the sandbox is reached through the file system, which a network namespace
  does not cover), socketpair() other than SOCK_STREAM, and io_uring_setup(); syscalls of another ABI (i386,
  x32) are refused too. Built by hand in ctypes (`_SocketFilter`, no compiled dependency) for x86_64 and
  aarch64; on another architecture there is no filter and `sandbox_report()["socket_filter"]` is False; a
  kernel that refuses the filter on a known architecture stops the run ("sandbox could not start");
- a bounded working folder: a private tmpfs of `max_dir_bytes` (64 MiB) and `max_dir_files` inodes mounted
  over it in the child's own mount namespace (root, or an unprivileged user namespace), so all files together,
  not only each one (RLIMIT_FSIZE), are bounded: a write past it fails with ENOSPC. The tmpfs is memory, freed
  with the sandbox's last process; `sandbox_report()["folder_bound"]` says whether it took;
- when the evaluator runs as root: the child drops to an unprivileged user (`nobody` by default) before exec.
  Only then is RLIMIT_NPROC enforced (Linux never applies it to uid 0) and do file permissions protect the
  evaluator's own files (also where Landlock is missing). If the interpreter is not readable by that user (e.g. it lives under
  /root), a system python of the same major.minor version is used instead; if there is none, the child stays
  root and `sandbox_report()` says that NPROC and file permissions do not protect;
- write confinement by the Landlock LSM (Linux >= 5.13, when the kernel enables it): the child and everything
  it starts can create, write, truncate, rename or delete files only beneath its working directory (and write
  /dev/null), whatever the file permissions say: world-writable /tmp, /var/tmp and /dev/shm included. Where
  the kernel supports Landlock ABI 6, the child also cannot signal processes outside its own sandbox.
  `sandbox_report()["write_confinement"]` says whether it took;
- no_new_privs (setuid binaries gain nothing) and a parent-death signal (the child dies with the evaluator);
- the wall-clock timeout kills the whole process group (SIGKILL), and so does the end of every run; the run
  then waits (at most 10 s) until the group is empty, i.e. until init has reaped every orphan, because until
  then they count against the sandbox user's RLIMIT_NPROC: after a fork bomb, the next program could not
  start a thread.

What is best-effort (Python-level, `guard=True`; bypassable by determined code, as HumanEval's own
`reliability_guard` warns): socket creation raises PermissionError; `os.fork`, `os.system`, `os.kill`,
`subprocess.Popen`, file deletion/renaming/chmod/chown and `shutil.rmtree` raise PermissionError; `open` and
`os.open` refuse to write outside the working directory. The environment is rebuilt from scratch (no proxy
variables, no credentials), HOME and TMPDIR point at the working directory.

Not protected: reading files the sandbox user may read; processes that call setsid() escape the group kill
(they still die from RLIMIT_CPU unless they sleep); concurrent sandboxes share the sandbox user's NPROC
budget, so a fork bomb in one can make a concurrent one fail to start. This is not a security boundary for
hostile code; use a VM or container sandbox for that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import os
import pwd
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
# Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on every architecture.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_SCOPE_SIGNAL = 1 << 1
_FS_WRITE_FILE, _FS_TRUNCATE, _FS_REFER = 1 << 1, 1 << 14, 1 << 13
# remove_dir, remove_file, make_char, make_dir, make_reg, make_sock, make_fifo, make_block, make_sym
_FS_CHANGE_TREE = sum(1 << bit for bit in range(4, 13))
PROGRAM_FILE = "program.py"
# seccomp (include/uapi/linux/seccomp.h, filter.h, audit.h).
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ALLOW, SECCOMP_RET_EPERM = 0x80000000, 0x7FFF0000, 0x00050000 | 1
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_AND_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x54, 0x06
_SOCK_STREAM, _SOCK_TYPE_MASK = 1, 0xF
X32_SYSCALL_BIT = 0x40000000


@dataclass(frozen=True)
class _SyscallTable:
    """What the socket filter needs to know of one architecture: its AUDIT_ARCH id and syscall numbers."""

    audit_arch: int
    socket: int
    socketpair: int
    io_uring_setup: int
    x32: bool = False  # x86_64 also accepts x32 calls (nr | X32_SYSCALL_BIT) under the same arch id


_SYSCALL_TABLES = {
    "x86_64": _SyscallTable(0xC000003E, socket=41, socketpair=53, io_uring_setup=425, x32=True),
    "aarch64": _SyscallTable(0xC00000B7, socket=198, socketpair=199, io_uring_setup=425),
}

Status = Literal["passed", "failed", "timeout"]


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation for one program run; see the module docstring for what each one protects."""

    timeout_s: float = 10.0  # wall-clock limit, seconds; the whole process group is killed after it
    memory_bytes: int = 2 << 30  # RLIMIT_AS, bytes of address space
    cpu_time_s: int | None = None  # RLIMIT_CPU, CPU seconds; None: ceil(timeout_s) + 1
    max_processes: int = 32  # RLIMIT_NPROC, processes + threads of the sandbox user (not enforced for root)
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE, bytes per written file (stdout/stderr included)
    max_dir_bytes: int | None = 64 << 20  # size of the private tmpfs working folder, all files together
    max_dir_files: int = 4096  # files and folders in that tmpfs (its nr_inodes)
    max_open_files: int = 256  # RLIMIT_NOFILE
    user: str | None = "auto"  # drop to this user when root; "auto": "nobody" if root; None: never drop
    python: str | None = None  # interpreter; None: sys.executable (or a same-version system python)
    isolate_network: bool = True  # new empty network namespace when the kernel allows it
    block_sockets: bool = True  # seccomp filter: no socket() of any family (AF_UNIX included) in the child
    guard: bool = True  # best-effort Python-level guard in the child (sockets, fork, deletes, writes)
    work_root: str | None = None  # parent folder of the temporary working folders; None: the system tmp
    output_chars: int = 4000  # characters kept from the end of stdout and of stderr

    def cpu_limit(self) -> int:
        return self.cpu_time_s if self.cpu_time_s is not None else math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program: status passed (exit 0), failed (anything else) or timeout, and why."""

    status: Status
    reason: str
    returncode: int | None = None
    duration_s: float = 0.0
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Identity:
    uid: int | None  # None: keep the evaluator's user
    gid: int | None
    python: str
    note: str = ""


@dataclass(frozen=True)
class _Landlock:
    """A Landlock ruleset that confines writes to `root`, prepared in the parent for a given kernel ABI."""

    root: str
    ruleset_attr: bytes  # struct landlock_ruleset_attr
    tree_rights: int  # allowed beneath root: every handled right
    file_rights: int  # allowed on /dev/null

    @staticmethod
    def abi_version(libc: ctypes.CDLL | None) -> int:
        """The kernel's Landlock ABI version, 0 where Landlock is missing or disabled."""
        if libc is None:
            return 0
        version = libc.syscall(
            SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION
        )
        return max(int(version), 0)

    @classmethod
    def for_root(cls, root: str, abi: int) -> _Landlock | None:
        if abi < 1:
            return None
        file_rights = _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
        handled = file_rights | _FS_CHANGE_TREE | (_FS_REFER if abi >= 2 else 0)
        if abi >= 6:  # handled_access_fs, handled_access_net, scoped
            attr = struct.pack("<QQQ", handled, 0, LANDLOCK_SCOPE_SIGNAL)
        else:
            attr = struct.pack("<Q", handled)
        return cls(os.path.realpath(root), attr, handled, file_rights)

    def apply(self, libc: ctypes.CDLL) -> None:
        """In the child, after no_new_privs: restrict this process and its future children."""
        attr = ctypes.create_string_buffer(self.ruleset_attr, len(self.ruleset_attr))
        ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(self.ruleset_attr)), 0)
        if ruleset < 0:
            return
        try:
            for path, rights in ((self.root, self.tree_rights), (os.devnull, self.file_rights)):
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    # struct landlock_path_beneath_attr { __u64 allowed_access; __s32 parent_fd; } (packed)
                    rule = ctypes.create_string_buffer(struct.pack("<Qi", rights, fd), 12)
                    libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0)
                finally:
                    os.close(fd)
            libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0)
        finally:
            os.close(ruleset)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]  # struct sock_fprog


class _SocketFilter:
    """A seccomp BPF program that refuses (EPERM) every new socket: socket() of any family (AF_UNIX included,
    which the network namespace does not cover: a path-based UNIX socket outside the sandbox is reachable
    through the file system), socketpair() other than SOCK_STREAM (a datagram pair could sendto() a path), and
    io_uring_setup() (io_uring can open and connect sockets without those syscalls). A stream socketpair
    stays allowed: it reaches nothing outside the process tree, and asyncio's event loop needs one. A syscall
    made under another ABI, whose numbers differ, cannot go around the numbers checked here: one of another
    architecture (i386 `int 0x80` on x86_64) kills the process, an x32 one fails with EPERM. A machine that is
    not in `_SYSCALL_TABLES` gets no filter, and `sandbox_report()["socket_filter"]` is False there.
    """

    def __init__(self, table: _SyscallTable) -> None:
        # struct seccomp_data: int nr (offset 0); __u32 arch (4); __u64 ip (8); __u64 args[6] (16 + 8 i);
        # args[1]'s low 32 bits are at 24 on these little-endian machines.
        ins: list[tuple[int, int, int, int]] = [
            (_BPF_LD_W_ABS, 0, 0, 4),
            (_BPF_JEQ_K, 1, 0, table.audit_arch),
            (_BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
            (_BPF_LD_W_ABS, 0, 0, 0),
        ]
        if table.x32:
            ins += [(_BPF_JGE_K, 0, 1, X32_SYSCALL_BIT), (_BPF_RET_K, 0, 0, SECCOMP_RET_EPERM)]
        for nr in (table.socket, table.io_uring_setup):
            ins += [(_BPF_JEQ_K, 0, 1, nr), (_BPF_RET_K, 0, 0, SECCOMP_RET_EPERM)]
        ins += [
            (_BPF_JEQ_K, 0, 4, table.socketpair),  # not socketpair: to the final ALLOW
            (_BPF_LD_W_ABS, 0, 0, 24),  # its type argument
            (_BPF_AND_K, 0, 0, _SOCK_TYPE_MASK),  # without SOCK_NONBLOCK / SOCK_CLOEXEC
            (_BPF_JEQ_K, 1, 0, _SOCK_STREAM),
            (_BPF_RET_K, 0, 0, SECCOMP_RET_EPERM),
            (_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        ]
        code = b"".join(struct.pack("=HBBI", *i) for i in ins)  # struct sock_filter
        self._filter = ctypes.create_string_buffer(code, len(code))
        self._prog = _SockFprog(len(ins), ctypes.addressof(self._filter))

    @staticmethod
    def for_machine() -> _SocketFilter | None:
        table = _SYSCALL_TABLES.get(os.uname().machine)
        return _SocketFilter(table) if table is not None and sys.platform.startswith("linux") else None

    def apply(self, libc: ctypes.CDLL) -> None:
        """In the child, after no_new_privs. Fails closed: a kernel that refuses the filter stops the run."""
        if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._prog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "the seccomp socket filter could not be installed")


def _map_own_ids(uid: int, gid: int) -> None:
    """In a new user namespace: keep the uid and gid the process had outside (its files are then its own)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


@dataclass(frozen=True)
class _Workdir:
    """A private tmpfs of bounded size mounted over the working folder, in the child's own mount namespace.

    RLIMIT_FSIZE bounds each file; this bounds all of them together (bytes and number of files): a write past
    it fails with ENOSPC. The mount is the child's alone (invisible to the evaluator, gone with the last
    process of the sandbox), so the program file is written into it again from here.
    """

    path: str
    size: int
    inodes: int
    program: bytes
    owner: tuple[int, int] | None  # (uid, gid) of the sandbox user, when the child drops to one

    def mount(self, libc: ctypes.CDLL) -> None:
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            return  # never let the tmpfs show up in the evaluator's mount namespace
        options = f"size={self.size},nr_inodes={self.inodes},mode=0700"
        if self.owner is not None:
            options += f",uid={self.owner[0]},gid={self.owner[1]}"
        path = os.fsencode(self.path)
        if libc.mount(b"tether-sandbox", path, b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()) != 0:
            return
        os.chdir(self.path)  # into the tmpfs: the old cwd is the folder beneath it
        fd = os.open(PROGRAM_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, self.program)
            if self.owner is not None:
                os.fchown(fd, *self.owner)
        finally:
            os.close(fd)


@dataclass
class _Preexec:
    """Runs in the forked child before exec: only syscalls on values prepared in the parent."""

    limits: list[tuple[int, int]]
    uid: int | None
    gid: int | None
    isolate_network: bool
    libc: ctypes.CDLL | None = field(default=None)
    landlock: _Landlock | None = None
    socket_filter: _SocketFilter | None = None
    workdir: _Workdir | None = None

    def __call__(self) -> None:
        if self.libc is not None:
            flags = (CLONE_NEWNET if self.isolate_network else 0) | (CLONE_NEWNS if self.workdir else 0)
            # Root may create these namespaces directly; others need a user namespace around them.
            if flags and self.libc.unshare(flags) != 0 and self.uid is None:
                uid, gid = os.getuid(), os.getgid()  # before the new namespace: it maps nobody yet
                if self.libc.unshare(CLONE_NEWUSER | flags) == 0:
                    _map_own_ids(uid, gid)
                else:
                    flags = 0
            if flags & CLONE_NEWNS and self.workdir is not None:
                self.workdir.mount(self.libc)
        for which, value in self.limits:
            resource.setrlimit(which, (value, value))
        if self.uid is not None and self.gid is not None:
            os.setgroups([])
            os.setgid(self.gid)
            os.setuid(self.uid)
        if self.libc is not None:
            self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            self.libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if self.landlock is not None:
                self.landlock.apply(self.libc)
            if self.socket_filter is not None:
                self.socket_filter.apply(self.libc)


# The child's entry point: read the program, install the guard, run it as __main__.
_BOOTSTRAP = r"""
import sys
def _guard():
    import builtins, io, os, shutil, socket, subprocess, _socket
    root = os.path.realpath(os.getcwd())
    def _denied(*args, **kwargs):
        raise PermissionError("disabled in the tether sandbox")
    for mod, names in (
        (socket, ("socket", "create_connection", "create_server", "socketpair", "fromfd")),
        (_socket, ("socket", "socketpair")),
        (os, ("kill", "killpg", "system", "fork", "forkpty", "posix_spawn", "posix_spawnp", "putenv",
              "remove", "removedirs", "rmdir", "unlink", "rename", "renames", "replace", "truncate",
              "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "setuid", "setgid")),
        (shutil, ("rmtree", "move", "chown")),
        (subprocess, ("Popen",)),
    ):
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, _denied)
    def _inside(path):
        if isinstance(path, int):
            return True
        real = os.path.realpath(os.fsdecode(os.fspath(path)))
        return real == root or real.startswith(root + os.sep) or real == os.devnull
    _open, _os_open = builtins.open, os.open
    def _guarded_open(file, mode="r", *args, **kwargs):
        if any(ch in mode for ch in "wax+") and not _inside(file):
            raise PermissionError(f"writing outside the sandbox folder is refused: {file!r}")
        return _open(file, mode, *args, **kwargs)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def _guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not _inside(path):
            raise PermissionError(f"writing outside the sandbox folder is refused: {path!r}")
        return _os_open(path, flags, *args, **kwargs)
    builtins.open = io.open = _guarded_open
    os.open = _guarded_os_open
with open(sys.argv[1], encoding="utf-8") as f:
    _source = f.read()
if sys.argv[2] == "1":
    _guard()
del _guard
exec(compile(_source, sys.argv[1], "exec"), {"__name__": "__main__", "__file__": sys.argv[1]})
"""

_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded (RLIMIT_CPU)",
    signal.SIGXFSZ: "file size limit exceeded (RLIMIT_FSIZE)",
    signal.SIGKILL: "killed (SIGKILL)",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGSYS: "a system call of another architecture, refused by the sandbox's seccomp filter",
}


@functools.lru_cache(maxsize=1)
def _socket_filter() -> _SocketFilter | None:
    return _SocketFilter.for_machine() if _libc() is not None else None


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _child_env(workdir: str) -> dict[str, str]:
    """A fresh environment: no proxies, tokens or PYTHON* variables from the evaluator."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _probe_python(python: str, uid: int | None, gid: int | None) -> tuple[int, int] | None:
    """(major, minor) of `python` when the given user can run it, else None."""
    pre = _Preexec(limits=[], uid=uid, gid=gid, isolate_network=False, libc=None)
    try:
        out = subprocess.run(
            [python, "-I", "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
            capture_output=True,
            text=True,
            timeout=30,
            preexec_fn=pre,
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    major, minor = out.stdout.split()
    return int(major), int(minor)


@functools.lru_cache(maxsize=16)
def _identity(user: str | None, python: str | None) -> _Identity:
    """Which user and interpreter the sandbox runs; cached per (user, python)."""
    is_root = os.geteuid() == 0
    if user == "auto":
        user = "nobody" if is_root else None
    if user is None:
        return _Identity(None, None, python or sys.executable)
    if not is_root:
        raise ValueError(f"sandbox user {user!r} needs the evaluator to run as root; use user=None")
    entry = pwd.getpwnam(user)
    uid, gid = entry.pw_uid, entry.pw_gid
    want = (sys.version_info[0], sys.version_info[1])
    candidates = [python] if python else [sys.executable]
    if not python:
        for name in (f"python{want[0]}.{want[1]}", "python3"):
            found = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
            if found:
                candidates.append(found)
    for i, cand in enumerate(dict.fromkeys(candidates)):
        version = _probe_python(cand, uid, gid)
        if version is not None and (python or version == want):
            note = "" if i == 0 else f"{sys.executable} is not runnable by {user}; using {cand}"
            return _Identity(uid, gid, cand, note)
    return _Identity(
        None,
        None,
        python or sys.executable,
        f"no python {want[0]}.{want[1]} runnable by {user}: the sandbox runs as root, so RLIMIT_NPROC and "
        "file permissions do not protect",
    )


def _rmtree_force(path: str) -> None:
    def onerror(func: Callable, p: str, _exc: object) -> None:
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def _tail(path: str, chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4 * chars))
        return f.read().decode("utf-8", errors="replace")[-chars:]


def _failure_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        sig = -returncode
        try:
            return _SIGNAL_REASONS.get(signal.Signals(sig), f"killed by signal {signal.Signals(sig).name}")
        except ValueError:
            return f"killed by signal {sig}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit code {returncode}"


def _kill_group(proc: subprocess.Popen, wait_s: float = 10.0) -> None:
    """SIGKILL the program's process group and wait until it is empty: its orphans are reaped by init, and
    until then they still count against the sandbox user's RLIMIT_NPROC (after a fork bomb the next program
    could not even start a thread). kill(-pgid, 0) succeeds while any member, zombies included, is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.005)


def run_program(program: str, config: SandboxConfig | None = None) -> ExecutionResult:
    """Run Python source `program` as __main__ in a sandboxed child process.

    Args:
        program: the full source (e.g. prompt + completion + tests + `check(entry_point)`).
        config: limits and isolation; defaults to `SandboxConfig()`.

    Returns:
        passed when the program exits with status 0; timeout when it outlives `timeout_s` (wall clock);
        failed otherwise, with the last line of stderr or the signal as the reason.
    """
    cfg = config or SandboxConfig()
    ident = _identity(cfg.user, cfg.python)
    workdir = tempfile.mkdtemp(prefix="tether-sandbox-", dir=cfg.work_root)
    logdir = tempfile.mkdtemp(prefix="tether-sandbox-log-")
    try:
        program_path = os.path.join(workdir, PROGRAM_FILE)
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        if ident.uid is not None:
            os.chown(workdir, ident.uid, ident.gid)
            os.chown(program_path, ident.uid, ident.gid)
        limits = [
            (resource.RLIMIT_AS, cfg.memory_bytes),
            (resource.RLIMIT_CPU, cfg.cpu_limit()),
            (resource.RLIMIT_FSIZE, cfg.max_file_bytes),
            (resource.RLIMIT_NOFILE, cfg.max_open_files),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, cfg.max_processes),
        ]
        landlock = _Landlock.for_root(workdir, _Landlock.abi_version(_libc()))
        socket_filter = _socket_filter() if cfg.block_sockets else None
        tmpfs = None
        if cfg.max_dir_bytes is not None:
            owner = (ident.uid, ident.gid) if ident.uid is not None and ident.gid is not None else None
            tmpfs = _Workdir(
                os.path.realpath(workdir), cfg.max_dir_bytes, cfg.max_dir_files, program.encode(), owner
            )
        preexec = _Preexec(
            limits, ident.uid, ident.gid, cfg.isolate_network, _libc(), landlock, socket_filter, tmpfs
        )
        cmd = [
            ident.python,
            "-I",
            "-B",
            "-X",
            "utf8",
            "-c",
            _BOOTSTRAP,
            PROGRAM_FILE,
            "1" if cfg.guard else "0",
        ]
        out_path, err_path = os.path.join(logdir, "stdout"), os.path.join(logdir, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=workdir,
                    env=_child_env(workdir),
                    stdin=subprocess.DEVNULL,
                    stdout=out_f,
                    stderr=err_f,
                    preexec_fn=preexec,
                    start_new_session=True,
                    close_fds=True,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                return ExecutionResult("failed", f"sandbox could not start: {exc}")
            timed_out = False
            try:
                proc.wait(timeout=cfg.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        duration = time.monotonic() - start
        returncode = proc.returncode
        stdout, stderr = _tail(out_path, cfg.output_chars), _tail(err_path, cfg.output_chars)
        if timed_out:
            return ExecutionResult(
                "timeout", f"timed out after {cfg.timeout_s:g} s (wall clock)", None, duration, stdout, stderr
            )
        if returncode == 0:
            return ExecutionResult("passed", "", 0, duration, stdout, stderr)
        return ExecutionResult(
            "failed", _failure_reason(returncode, stderr), returncode, duration, stdout, stderr
        )
    finally:
        _rmtree_force(workdir)
        _rmtree_force(logdir)


def run_programs(
    programs: Sequence[str], config: SandboxConfig | None = None, max_workers: int = 4
) -> list[ExecutionResult]:
    """Run many programs, at most `max_workers` sandboxes at a time; results in input order.

    The pool's threads only start children and wait on them; each program still runs in its own process.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if max_workers == 1 or len(programs) <= 1:
        return [run_program(p, config) for p in programs]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda p: run_program(p, config), programs))


# posix.open, not the guarded os.open: the probe asks the kernel whether a write outside the folder is possible.
_PROBE = """
import json, os, posix
outside = os.path.join(os.path.dirname(os.getcwd()), f"tether-probe-{os.getpid()}")
try:
    posix.close(posix.open(outside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    posix.unlink(outside)
    confined = False
except PermissionError:
    confined = True
import _socket  # SocketType: the class itself, which the Python guard does not replace
try:
    _socket.SocketType(_socket.AF_UNIX, _socket.SOCK_STREAM).close()
    filtered = False
except PermissionError:
    filtered = True
with open("/proc/self/mountinfo") as f:  # fields: ... mount point (5th) ... " - " fstype ...
    mounts = [(line.split()[4], line.split(" - ")[1].split()[0]) for line in f]
bounded = (os.getcwd(), "tmpfs") in mounts
print(json.dumps({"uid": os.getuid(), "netns": os.readlink("/proc/self/ns/net"), "confined": confined,
                  "filtered": filtered, "bounded": bounded}))
"""


def sandbox_report(config: SandboxConfig | None = None) -> dict[str, object]:
    """Which protections are real on this machine for `config`, found by running a probe program.

    Returns:
        {"python", "user_id", "nproc_enforced", "file_permissions", "network_namespace", "write_confinement",
        "socket_filter", "folder_bound", "note"}:
        nproc_enforced: the child's real user is not root (Linux exempts uid 0 from RLIMIT_NPROC);
        file_permissions: the child runs as a different, unprivileged user than the evaluator, so the
        evaluator's files are protected by the kernel; network_namespace: the child's network namespace
        differs from the evaluator's; write_confinement: the kernel (Landlock) refuses the child's writes outside
        its working directory; socket_filter: the kernel (seccomp) refuses the child's socket(AF_UNIX) (False
        where the filter is off or the machine's architecture has no syscall table here); folder_bound: the
        working folder is the private tmpfs of `max_dir_bytes` (False where no mount namespace could be made).
    """
    cfg = config or SandboxConfig()
    ident = _identity(cfg.user, cfg.python)
    result = run_program(_PROBE, cfg)
    if not result.passed:
        raise RuntimeError(f"sandbox probe failed: {result.reason}\n{result.stderr}")
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    dropped = ident.uid is not None and probe["uid"] == ident.uid
    return {
        "python": ident.python,
        "user_id": ident.uid if dropped else os.geteuid(),
        "nproc_enforced": dropped or os.geteuid() != 0,
        "file_permissions": dropped,
        "network_namespace": probe["netns"] != os.readlink("/proc/self/ns/net"),
        "write_confinement": probe["confined"],
        "socket_filter": probe["filtered"],
        "folder_bound": probe["bounded"],
        "note": ident.note,
    }
