"""The bubblewrap (`bwrap`) command line of the strong code-sandbox level, and the PID namespace it creates.

Purpose: `bwrap_argv` builds a fresh root that holds only what the interpreter needs, read-only: /usr (and the
/bin, /lib, /lib64, /sbin links or dirs), the interpreter's prefix at its own path, /etc/ld.so.cache and
/etc/localtime; the scratch dir read-write at /scratch (the cwd and HOME); a new /proc, remounted read-only (the
program maps to the trainer's uid outside its user namespace, so a writable /proc/sys would let a root trainer's
sandbox write sysctls); a minimal /dev. New user, PID, network, IPC, UTS and cgroup namespaces, uid/gid 65534 inside,
no capabilities, no nested user namespaces, a new session (no terminal to inject input into), killed with its
parent, a cleared environment, and the seccomp filter read from a file descriptor. Everything else (the trainer's
files, /etc/shadow, /tmp and /run with their unix sockets, other processes, the network) does not exist inside.

`PidNamespace` reads bubblewrap's --info-fd report and holds a pidfd on the namespace's init, so that the call can
kill it and wait until it is gone: when the init dies the kernel kills every process in the namespace. Design
limits: needs bubblewrap >= 0.5 (--disable-userns needs 0.8) and Linux >= 5.3 (pidfd). Departures from the paper:
none (the paper has no sandbox). Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time

SCRATCH_IN_SANDBOX = "/scratch"
NOBODY = 65534  # uid/gid of the program inside: the conventional unprivileged "nobody"
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
_INFO_CAP_BYTES = 1 << 16  # bubblewrap's report is a few hundred bytes


def bwrap_argv(
    bwrap: str, scratch: str, prefix: str, env: dict[str, str], *, seccomp_fd: int, info_fd: int
) -> list[str]:
    """bubblewrap options for a sandbox around `scratch`; append the command to run."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    argv += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    argv += ["--seccomp", str(seccomp_fd), "--info-fd", str(info_fd)]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    if not prefix.startswith("/usr/"):
        argv += ["--ro-bind", prefix, prefix]
    for path in _ETC_FILES:
        argv += ["--ro-bind-try", path, path]
    argv += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev"]
    argv += ["--bind", scratch, SCRATCH_IN_SANDBOX, "--chdir", SCRATCH_IN_SANDBOX]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    return argv


class PidNamespace:
    """The init of bubblewrap's PID namespace, found through --info-fd and held by a pidfd (None: never started)."""

    def __init__(self, info_read_fd: int, deadline: float) -> None:
        self.pidfd: int | None = None
        data = b""
        while len(data) < _INFO_CAP_BYTES:
            ready, _, _ = select.select([info_read_fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(info_read_fd, 4096) if ready else b""
            if not chunk:
                break  # EOF: bubblewrap wrote its report (or failed before it), or the deadline passed
            data += chunk
        try:
            info = json.loads(data)
            pid, namespace = int(info["child-pid"]), int(info["pid-namespace"])
        except (ValueError, KeyError, TypeError):
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # already gone (the namespace died with it)
        try:  # the pid may have been reused since the report: only keep a pidfd on the namespace's own init
            same = os.readlink(f"/proc/{pid}/ns/pid") == f"pid:[{namespace}]"
        except OSError:
            same = False
        if same:
            self.pidfd = pidfd
        else:
            os.close(pidfd)

    def kill_and_wait(self, timeout_s: float) -> bool:
        """SIGKILL the namespace's init (so every process in it) and wait for it to exit; whether it did."""
        if self.pidfd is None:
            return True
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass  # exited already
        ready, _, _ = select.select([self.pidfd], [], [], timeout_s)  # a pidfd is readable once its process exits
        os.close(self.pidfd)
        self.pidfd = None
        return bool(ready)
