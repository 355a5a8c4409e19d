"""Seccomp filters of the code sandbox, built with libseccomp (through `pyseccomp`) and exported as BPF.

Purpose: whatever a program reaches inside its interpreter (ctypes, `_posixsubprocess` under another name, raw
syscalls), the kernel refuses these system calls with EPERM, at both isolation levels:
- signals and other processes: kill, tkill, tgkill, rt_(tg)sigqueueinfo, pidfd_open / send_signal / getfd, ptrace,
  process_vm_readv / writev, process_madvise, kcmp, move_pages, migrate_pages, scheduling and I/O priority of any
  process, prlimit64 on another process;
- new processes: fork, vfork, clone without CLONE_THREAD (threads stay allowed), clone3 (ENOSYS, so glibc falls back
  to clone, which is checked); execve / execveat once the harness runs (second filter, `HARNESS`);
- network and IPC: socket, socketpair, connect, bind;
- namespaces and mounts: mount, umount2, the new mount API, pivot_root, chroot, unshare, setns;
- file metadata outside what Landlock covers: chmod / chown family, extended attributes, mknod, open_by_handle_at;
- kernel surfaces: io_uring, bpf, perf_event_open, userfaultfd, keyctl / add_key / request_key, TIOCSTI / TIOCLINUX;
- privileged: reboot, kexec, modules, swapon/off, acct, clocks, host/domain name, iopl/ioperm, syslog, quotactl.
The base filter (`BASE`) also covers the interpreter's start-up (bubblewrap loads it before exec); `HARNESS` adds
exec and setting rlimits, loaded by the harness after it set its own limits. Python's start-up, threads, time,
random, math, tempfile and sqlite need none of these (`test_interpreter_features_work_under_the_filters`).

Design limits: tested on x86_64, where a syscall of another ABI (x32 numbers, i386 `int 0x80`) kills the process
(libseccomp's bad-architecture action; `x32_syscall` attack test); the clone rule reads the flags from argument 0,
which holds on x86_64 and aarch64 but not s390. Departures from the paper: the paper has no code sandbox.
Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import errno
import functools
import tempfile
from typing import Literal

CLONE_THREAD = 0x00010000
TIOCSTI, TIOCLINUX = 0x5412, 0x541C  # inject input into / control a terminal

_DENIED = (
    # signals and other processes
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "pidfd_send_signal",
    "pidfd_getfd", "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "process_mrelease", "kcmp",
    "move_pages", "migrate_pages", "setpriority", "sched_setscheduler", "sched_setparam", "sched_setattr",
    "sched_setaffinity", "ioprio_set",
    # new processes (clone is handled by argument below)
    "fork", "vfork",
    # network and IPC
    "socket", "socketpair", "connect", "bind",
    # namespaces and mounts
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    # file metadata that Landlock does not cover (and the read-only binds cover only outside the scratch dir)
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat", "setxattr", "lsetxattr",
    "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "mknod", "mknodat", "name_to_handle_at",
    "open_by_handle_at",
    # kernel surfaces
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open", "userfaultfd", "keyctl",
    "add_key", "request_key",
    # privileged
    "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "swapon", "swapoff",
    "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "iopl",
    "ioperm", "syslog", "quotactl", "quotactl_fd", "vhangup", "uselib", "lookup_dcookie",
)  # fmt: skip
_DENIED_IN_HARNESS = ("execve", "execveat", "setrlimit")


def _load_pyseccomp():
    try:
        import pyseccomp  # optional dependency (extra `code`): only the code reward's sandbox needs it
    except (ImportError, OSError) as exc:  # OSError: pyseccomp is there but libseccomp.so.2 is not
        raise RuntimeError(
            "the code sandbox needs libseccomp and its binding: `pip install 'dash-rl[code]'` (pyseccomp) and the "
            f"system package libseccomp2 ({type(exc).__name__}: {exc})"
        ) from exc
    return pyseccomp


def _deny(flt, sc, name: str, err: int = errno.EPERM, *args) -> None:
    try:
        flt.add_rule(sc.ERRNO(err), name, *args)
    except (OSError, ValueError) as exc:  # a name this libseccomp does not know for this architecture
        if name in ("fchmodat2", "quotactl_fd", "mount_setattr", "process_mrelease", "lookup_dcookie", "uselib"):
            return  # recent or removed syscalls: absent on some architectures / libseccomp versions
        raise RuntimeError(f"seccomp: cannot add a rule for {name}: {exc}") from exc


@functools.cache
def filter_bpf(stage: Literal["base", "harness"]) -> bytes:
    """The BPF program of one stage, as libseccomp exports it (native byte order, 8 bytes per instruction)."""
    sc = _load_pyseccomp()
    flt = sc.SyscallFilter(sc.ALLOW)
    if stage == "base":
        for name in _DENIED:
            _deny(flt, sc, name)
        _deny(flt, sc, "clone", errno.EPERM, sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))  # arg 0: flags (x86_64, arm64)
        _deny(flt, sc, "clone3", errno.ENOSYS)  # its flags are in memory, out of seccomp's reach: make glibc use clone
        _deny(flt, sc, "prlimit64", errno.EPERM, sc.Arg(0, sc.NE, 0))  # another process's limits
        for request in (TIOCSTI, TIOCLINUX):
            _deny(flt, sc, "ioctl", errno.EPERM, sc.Arg(1, sc.EQ, request))
    elif stage == "harness":
        for name in _DENIED_IN_HARNESS:
            _deny(flt, sc, name)
        _deny(flt, sc, "prlimit64", errno.EPERM, sc.Arg(2, sc.NE, 0))  # setting a limit (reading stays allowed)
    else:
        raise ValueError(f"unknown seccomp stage {stage!r}")
    with tempfile.TemporaryFile() as out:  # libseccomp writes to a file descriptor
        flt.export_bpf(out)
        out.seek(0)
        return out.read()


def seccomp_problem() -> str | None:
    """Why the filters cannot be built here (missing pyseccomp / libseccomp), or None."""
    try:
        filter_bpf("base")
        filter_bpf("harness")
    except RuntimeError as exc:
        return str(exc)
    return None
