"""The program that runs inside the code sandbox: lock itself down, run the completion, send back program values.

Purpose: `dash/rewards/sandbox.py` starts `python -I -B -S -c <this file's text>` in a fresh scratch dir (inside
bubblewrap at the `sandbox` level). It reads its job from `_job.json` (and deletes it), then, before any untrusted
code runs: sets the rlimits, applies Landlock (basic level: reads only the listed system dirs, writes only the
scratch dir, no TCP, no signals or abstract unix sockets out of the domain), drops privileges (basic level as root:
uid/gid 65534, or at least every capability), loads the seccomp filters the trainer built with libseccomp, and
points stdin/stdout/stderr at /dev/null. Then it runs the row's setup, the program, and each test's steps; for every
"eval" step it writes the value, encoded with exact builtin types only (`encode`), as a JSON line on a private copy
of the old stdout. Any failure to lock down exits with LOCKDOWN_FAILED before the "ready" record, which the trainer
reports as a SandboxError.

Nothing here is trusted by the trainer: the program shares this interpreter and may rewrite every record. That is
why the records carry program values only (no pass marks, no expected values; see `dash/rewards/verdict.py`).
Only the standard library is used (the trainer's packages are not visible inside). Importing this module has no
side effects, so tests import `encode` from it.
"""

import ctypes
import json
import os
import resource
import sys

LOCKDOWN_FAILED = 3  # exit code: the sandbox could not be set up (not a verdict on the program)
MAX_DEPTH = 32  # must match dash.rewards.records.MAX_DEPTH: deeper values are refused on both sides
MAX_VALUE_BYTES = 1 << 20  # one encoded value; a larger one is not sent (the check then fails)
_NR = {"landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446}  # all archs
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, _PR_CAP_AMBIENT = 38, 22, 2, 47
_CAP_VERSION_3 = 0x20080522
# Landlock access rights by ABI version (include/uapi/linux/landlock.h).
_FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_FS_READ = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE | READ_FILE | READ_DIR
_FS_FILE_ONLY = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)  # rights valid on a file (not a dir) rule
_NET_TCP, _SCOPE_UNIX_AND_SIGNAL = 3, 3  # BIND_TCP | CONNECT_TCP (ABI 4); ABSTRACT_UNIX_SOCKET | SIGNAL (ABI 6)

_BUILTIN_TAGS = {int: "i", float: "f", bytes: "y", complex: "c", list: "l", tuple: "t", set: "s", frozenset: "z"}
# A subclass (Counter, namedtuple, IntEnum...) is reduced to its base builtin with the base type's own methods,
# so an overridden __eq__ / __iter__ plays no part; anything else (a custom class) is not encodable.
_BASES = (
    (bool, bool), (int, int.__int__), (float, float.__float__), (complex, complex.__complex__),
    (str, str.__str__), (bytes, bytes.__bytes__), (dict, lambda d: dict(dict.items(d))),
    (list, lambda x: list(list.__iter__(x))), (tuple, lambda x: tuple(tuple.__iter__(x))),
    (frozenset, lambda x: frozenset(frozenset.__iter__(x))), (set, lambda x: set(set.__iter__(x))),
)  # fmt: skip


def encode(value, depth=0):
    """JSON-able form of a value built from exact builtin types (see `dash.rewards.records.decode_value`)."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    if value is None or type(value) in (bool, str):
        return value
    kind = type(value)
    if kind not in _BUILTIN_TAGS and kind is not dict:
        for base, convert in _BASES:
            if isinstance(value, base):
                return encode(convert(value), depth)
        raise TypeError("not a builtin value: " + kind.__name__)
    if kind is int:
        return {"i": str(value)}
    if kind is float:
        return {"f": repr(value)}
    if kind is bytes:
        return {"y": value.hex()}
    if kind is complex:
        return {"c": [repr(value.real), repr(value.imag)]}
    if kind is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]}
    return {_BUILTIN_TAGS[kind]: [encode(item, depth + 1) for item in value]}


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _long(*args):
    """Variadic C calls (syscall, prctl) read full registers: pass integers as C longs, not ctypes' default int."""
    return [ctypes.c_long(a) if isinstance(a, int) else a for a in args]


def _check(result, what):
    if result < 0:
        raise OSError(ctypes.get_errno(), what)
    return result


def _landlock(libc, read_paths, write_paths):
    """Allow reads of `read_paths`, everything in `write_paths`, nothing else on the filesystem; no TCP, no signals."""
    abi = _check(libc.syscall(*_long(_NR["landlock_create_ruleset"], None, 0, 1)), "landlock version")
    fs_all = _FS_RIGHTS_BY_ABI.get(abi, _FS_RIGHTS_BY_ABI[5])
    attr = (ctypes.c_uint64 * 3)(fs_all, _NET_TCP if abi >= 4 else 0, _SCOPE_UNIX_AND_SIGNAL if abi >= 6 else 0)
    size = 8 * (1 if abi < 4 else 2 if abi < 6 else 3)
    ruleset = _check(libc.syscall(*_long(_NR["landlock_create_ruleset"], attr, size, 0)), "landlock ruleset")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    for paths, rights in ((read_paths, _FS_READ), (write_paths, fs_all)):
        for path in paths:
            if not os.path.exists(path):
                continue
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                allowed = rights & fs_all if os.path.isdir(path) else rights & fs_all & _FS_FILE_ONLY
                rule = PathBeneath(allowed, fd)
                added = libc.syscall(*_long(_NR["landlock_add_rule"], ruleset, 1, ctypes.byref(rule), 0))
                _check(added, "landlock " + path)
            finally:
                os.close(fd)
    _check(libc.syscall(*_long(_NR["landlock_restrict_self"], ruleset, 0)), "landlock restrict")
    os.close(ruleset)


def _drop_privileges(libc, uid):
    """Root only: become `uid` (its own group, no others), or else keep uid 0 but drop every capability."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # from uid 0 to non-zero clears all capabilities too
        return
    libc.prctl(*_long(_PR_CAP_AMBIENT, 4, 0, 0, 0))  # PR_CAP_AMBIENT_CLEAR_ALL
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all zero
    _check(libc.capset(header, data), "capset")


def _seccomp(libc, filters):
    """Load each BPF program (exported by libseccomp in the trainer); filters only ever add restrictions."""

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    for blob in filters:
        code = bytes.fromhex(blob)
        buf = ctypes.create_string_buffer(code, len(code))
        prog = Program(len(code) // 8, ctypes.addressof(buf))  # struct sock_filter is 8 bytes
        _check(libc.prctl(*_long(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)), "seccomp")


def _lockdown(job):
    for name, soft, hard in job["limits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    libc = _libc()
    _check(libc.prctl(*_long(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)), "no_new_privs")
    if job["landlock"] is not None:
        _landlock(libc, job["landlock"]["read"], job["landlock"]["write"])
    if job["drop_root"] and os.getuid() == 0:
        _drop_privileges(libc, job["drop_uid"])
    _seccomp(libc, job["filters"])
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # not a barrier (the program may import ctypes again): seccomp is


def _main():
    # Bound before the program runs, so that patching builtins or os cannot change how tests run or are reported.
    run, evaluate, compile_, write, dumps = exec, eval, compile, os.write, json.dumps
    with open("_job.json") as f:
        job = json.load(f)
    os.remove("_job.json")
    out = os.dup(1)
    try:
        null = os.open(os.devnull, os.O_RDWR)
        _lockdown(job)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
    except Exception as exc:  # noqa: BLE001 -- reported to the trainer as a sandbox failure
        write(out, ("lockdown failed: %r\n" % (exc,)).encode())
        os._exit(LOCKDOWN_FAILED)

    def send(record):
        line = dumps(record, separators=(",", ":")) + "\n"
        if len(line) <= MAX_VALUE_BYTES:
            write(out, line.encode())

    send({"ready": 1})
    env = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        run(compile_(job["setup"], "setup.py", "exec"), env)
        run(compile_(job["code"], "solution.py", "exec"), env)
    except BaseException:  # noqa: BLE001 -- the program failed: no test ran
        return
    for i, steps in enumerate(job["tests"]):
        slot = 0
        try:
            for kind, source in steps:
                if kind == "exec":
                    run(compile_(source, "test_%d.py" % i, "exec"), env)
                else:
                    value = evaluate(compile_(source, "test_%d.py" % i, "eval"), env)
                    try:
                        send({"t": i, "k": slot, "v": encode(value)})
                    except (TypeError, ValueError, RecursionError):
                        pass  # not a builtin value: this check fails in the trainer
                    slot += 1
            send({"t": i, "ok": 1})
        except BaseException:  # noqa: BLE001 -- this test failed; the next one still runs
            pass


if __name__ == "__main__":
    _main()
    os._exit(0)  # do not wait for threads the program left running, nor run its atexit handlers
