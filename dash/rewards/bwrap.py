"""The bubblewrap (`bwrap`) command line of the strong code-sandbox level, how root starts it, and its PID namespace.

Purpose: `bwrap_argv` builds a fresh root that holds only what the interpreter needs, read-only: /usr (and the
/bin, /lib, /lib64, /sbin links or dirs), the interpreter's prefix at its own path, /etc/ld.so.cache and
/etc/localtime; the scratch dir read-write at /scratch (the cwd and HOME); a new /proc, remounted read-only; a
minimal /dev. New user, PID, network, IPC, UTS and cgroup namespaces, uid/gid 65534 inside, no capabilities, no
nested user namespaces, a new session (no terminal to inject input into), killed with its parent, a cleared
environment, and the seccomp filter read from a file descriptor. Everything else (the trainer's files, /etc/shadow,
/tmp and /run with their unix sockets, other processes, the network) does not exist inside.

Outside its user namespace the program has the uid of whoever started bubblewrap, so a trainer running as root
never starts it itself: `as_nobody` starts it as uid/gid 65534 with no supplementary groups, and the program's
kernel credentials are 65534:65534 outside too (else /proc/sys, /etc/shadow and every root-owned file would be its
own; /proc stays read-only as a second layer). bubblewrap resolves bind sources with its caller's permissions, so
where every dir on the way to the interpreter prefix and the scratch dir is searchable by others, Popen simply
starts it as 65534. Where one is not (pyenv under /root, mode 700; pytest's tmp dirs), a first bubblewrap runs as
root with nothing unshared but the mounts: in that private copy of the trainer's mount table a mode-755 tmpfs
covers each outermost such dir and only the prefix and the scratch dir are bound back at their own paths (the rest
of /root stays hidden), then util-linux `unshare --fork --setuid --setgid` (no namespace) drops to 65534 and runs
the sandbox's bubblewrap there. These two root helpers belong to the trainer, not to the program: bubblewrap's
monitor keeps uid 0 but no capabilities, unshare's parent waits with root's, and neither is in the program's
namespaces. A trainer that is not root, or is root of a user namespace without uid 65534, starts bubblewrap itself
as before (the program then has the trainer's uid outside).

`PidNamespace` reads bubblewrap's --info-fd report and holds a pidfd on the namespace's init, so that the call can
kill it and wait until it is gone: when the init dies the kernel kills every process in the namespace. Design
limits: needs bubblewrap >= 0.5 (--disable-userns needs 0.8), Linux >= 5.3 (pidfd), and util-linux `unshare` with
--setuid/--setgid (tested: 2.38) when a root trainer's interpreter or scratch dir is not searchable by uid 65534;
the root helpers then add about 10-25 ms to a call (2 busy cores). Uid 65534 is shared with the host's other
`nobody` processes, which could reach a running call's scratch dir (mode 700, owned by 65534) where TMPDIR is
searchable. Departures from the paper: none (the paper has no sandbox).
Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import stat
import time
from pathlib import Path

SCRATCH_IN_SANDBOX = "/scratch"
NOBODY = 65534  # uid/gid of the program inside: the conventional unprivileged "nobody"
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
_INFO_CAP_BYTES = 1 << 16  # bubblewrap's report is a few hundred bytes
_EXPOSED_DIR_MODE = "0755"  # the tmpfs over an unsearchable dir, and the dirs on the way to what is bound back


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


@functools.cache
def nobody_is_mapped() -> bool:
    """Whether uid and gid 65534 exist in this process's user namespace (a container's root may not have them)."""

    def maps(path: str) -> bool:
        rows = [line.split() for line in Path(path).read_text().splitlines()]
        return any(int(inside) <= NOBODY < int(inside) + int(count) for inside, _, count in rows)

    return maps("/proc/self/uid_map") and maps("/proc/self/gid_map")


def unsearchable_dirs(paths: list[str]) -> list[str]:
    """For each of `paths` (absolute, resolved), the outermost dir on the way that others cannot search (no o+x);
    what lies below it is hidden by the tmpfs that covers it."""
    found = set()
    for path in paths:
        for parent in reversed(Path(path).parents[:-1]):  # from just below "/" down to the path's own parent
            if not parent.stat().st_mode & stat.S_IXOTH:
                found.add(str(parent))
                break
    return sorted(found)


def as_nobody(argv: list[str], exposed: list[str], unshare: str = "unshare") -> tuple[list[str], dict]:
    """Root only: (command, Popen credential arguments) that run the bubblewrap command `argv` as uid/gid 65534
    with no supplementary groups, where it can reach every path in `exposed` (absolute, resolved dirs)."""
    hidden = unsearchable_dirs(exposed)
    if not hidden:  # nothing to expose: Popen drops the credentials before it executes bubblewrap
        return argv, {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    outer, made = [argv[0], "--dev-bind", "/", "/", "--die-with-parent"], set()
    for top in hidden:
        outer += ["--perms", _EXPOSED_DIR_MODE, "--tmpfs", top]
    for path in exposed:
        top = next((d for d in hidden if path.startswith(d + os.sep)), None)
        if top is None:
            continue  # searchable already
        for parent in reversed(Path(path).parents[: len(Path(path).relative_to(top).parts) - 1]):
            if str(parent) not in made:
                made.add(str(parent))
                outer += ["--perms", _EXPOSED_DIR_MODE, "--dir", str(parent)]
        outer += ["--bind", path, path]
    # util-linux `unshare --fork`, no namespace unshared: its child drops to 65534 (setgroups([]), setgid, setuid)
    # and executes the sandbox's bubblewrap; its parent waits as root. That parent matters: the kernel sends a
    # parent-death signal only where the dying parent may signal the child, and bubblewrap's monitor keeps uid 0
    # but no capabilities, so it could not reach a uid-65534 child; this parent dies with it and, holding
    # CAP_KILL, takes the sandbox with it.
    drop = [unshare, "--fork", f"--setuid={NOBODY}", f"--setgid={NOBODY}", "--"]
    return outer + ["--"] + drop + argv, {}


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
