"""Hostile completions from issue 19, each with tests whose pass flags show what the sandbox allowed.

Why here: `sandbox_attack_driver.py` runs them inside a throwaway PID namespace; `test_code_sandbox_attacks.py`
checks the flags and the driver's report. Each attack is `fn(ctx) -> (program, tests, options)`; `EXPECTED[name]`
are the pass flags when the sandbox holds. Programs record every attempt as an errno name ('EPERM', 'ENOENT', ...),
an exception name, or 'ok:<result>' (the attempt worked: a failure of the sandbox). Attacks never aim at real
system files with a write: a chmod of a system file keeps its mode and a sysctl is opened, never written.
"""

from __future__ import annotations

PRELUDE = """
import errno as _errno, os, sys
def _why(fn):
    try:
        return 'ok:' + repr(fn())[:200]
    except OSError as e:
        return _errno.errorcode.get(e.errno, type(e).__name__)
    except Exception as e:
        return type(e).__name__
DONE = 1
"""


def _posixsubprocess_renamed(ctx):
    script = f"for i in $(seq 20); do sleep 300 & done; exec 3<>/dev/tcp/127.0.0.1/{ctx['port']}; kill -9 $PPID"
    code = f"""
import importlib.util, subprocess
spec = importlib.util.find_spec('_posixsubprocess')
innocent = importlib.util.module_from_spec(spec)
sys.modules['innocent'] = innocent
subprocess._fork_exec = innocent.fork_exec
S = {script!r}
R = [_why(lambda: subprocess.Popen(['/bin/bash', '-c', S]).pid),
     _why(lambda: (os._exit(0) if (p := os.fork()) == 0 else p)),
     _why(lambda: os.posix_spawn('/bin/bash', ['bash', '-c', S], {{}})),
     _why(lambda: os.execv('/bin/bash', ['bash', '-c', S])),
     _why(lambda: os.system(S))]
"""
    # os.system cannot fork its shell: -1, or glibc's "shell could not run" status 127 << 8.
    return code, ["assert R[:4] == ['EPERM', 'EPERM', 'EPERM', 'EPERM']", "assert R[4] in ('ok:-1', 'ok:32512')"], {}


def _pidfd_kill_parent(ctx):
    code = "import signal\nR = [_why(lambda: signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9))]"
    return code, ["assert R == ['EPERM']"], {}


def _kill_all(ctx):
    return "R = [_why(lambda: os.kill(-1, 9))]", ["assert R == ['EPERM']"], {}


def _kill_parent(ctx):
    code = "pp = os.getppid()\nR = [_why(lambda: os.kill(pp, 9)), _why(lambda: os.killpg(os.getpgid(pp), 9))]"
    return code, ["assert R == ['EPERM', 'EPERM']"], {}


def _dir_fd_writes(ctx):
    code = f"""
W = {ctx['workdir']!r}
def opened(path): return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
R = [_why(lambda: os.open('planted.txt', os.O_CREAT | os.O_WRONLY, dir_fd=opened(W))),
     _why(lambda: os.remove('victim.txt', dir_fd=opened(W))),
     _why(lambda: os.open('../' * 12 + W.lstrip('/') + '/planted.txt', os.O_CREAT | os.O_WRONLY, dir_fd=opened('.'))),
     _why(lambda: os.remove(W.lstrip('/') + '/victim.txt', dir_fd=opened('/')))]
"""
    return code, ["assert set(R) <= {'ENOENT', 'EACCES'}", "assert len(R) == 4"], {}


def _fchmod(ctx):
    code = f"""
W = {ctx['workdir']!r}
def same_mode(path):
    fd = os.open(path, os.O_RDONLY)
    return os.fchmod(fd, os.fstat(fd).st_mode & 0o7777)  # no change even if it were allowed
R = [_why(lambda: os.fchmod(os.open('mine.txt', os.O_CREAT | os.O_WRONLY), 0o600)),
     _why(lambda: same_mode('/usr/bin/env')),
     _why(lambda: os.fchmod(os.open(W + '/victim.txt', os.O_RDONLY), 0o777)),
     _why(lambda: os.chmod(W + '/victim.txt', 0o777))]
"""
    return code, ["assert R[:2] == ['EPERM', 'EPERM']", "assert set(R[2:]) <= {'EPERM', 'ENOENT', 'EACCES'}"], {}


def _sqlite(ctx):
    code = f"""
import sqlite3
W = {ctx['workdir']!r}
def make(target, **kw):
    c = sqlite3.connect(target, **kw)
    c.execute('create table t(x)')
    c.commit()
    return 'made'
R = [_why(lambda: make(W + '/planted.db')), _why(lambda: make('file:' + W + '/victim.txt?mode=rw', uri=True)),
     _why(lambda: make('inside.db'))]
"""
    return code, ["assert R == ['OperationalError', 'OperationalError', \"ok:'made'\"]"], {}


def _proc_environ(ctx):
    code = """
def read_all():
    pids = ['self', str(os.getppid()), '1'] + [p for p in os.listdir('/proc') if p.isdigit()]
    return ' '.join(_why(lambda: open('/proc/%s/environ' % p, 'rb').read().decode(errors='replace')) for p in pids)
R = _why(read_all)
"""
    return code, ["assert DONE == 1", f"assert {ctx['api_key']!r} in R"], {}


def _gc_ctypes(ctx):
    code = """
import gc
ct = next((o for o in gc.get_objects() if type(o).__name__ == 'module' and o.__name__ == 'ctypes'), None)
if ct is None:
    import ctypes as ct
libc = ct.CDLL(None, use_errno=True)
def call(name, *args):
    return 'ok' if getattr(libc, name)(*args) >= 0 else _errno.errorcode.get(ct.get_errno(), '?')
pp = os.getppid()
R = [call('kill', pp, 9), call('kill', -1, 9), call('tgkill', pp, pp, 9), call('socket', 2, 1, 0),
     call('ptrace', 16, pp, 0, 0), call('unshare', 0x10000000), call('mount', b'none', b'/', b'tmpfs', 0, None)]
"""
    return code, ["assert R == ['EPERM', 'EPERM', 'EPERM', 'EPERM', 'EPERM', 'EPERM', 'EPERM']"], {}


def _unix_socket(ctx):
    code = f"""
import socket
def connect(address):
    s = socket.socket(socket.AF_UNIX)
    s.connect(address)
    return 'connected'
R = [_why(lambda: connect({ctx['unix']!r})), _why(lambda: connect('\\0dash-abstract'))]
"""
    return code, ["assert R == ['EPERM', 'EPERM']"], {}


def _tcp_loopback(ctx):
    code = f"""
import socket
R = [_why(lambda: socket.create_connection(('127.0.0.1', {ctx['port']}), timeout=2)),
     _why(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {ctx['port']})))]
"""
    return code, ["assert R == ['EPERM', 'EPERM']"], {}


def _read_secrets(ctx):
    paths = ("/etc/shadow", ctx["workdir"] + "/secret.txt", ctx["repo_file"])
    code = f"R = [_why(lambda: open(p).read()) for p in {paths!r}]"
    tests = ["assert DONE == 1", "assert 'root:' in R[0]", f"assert {ctx['secret']!r} in R[1]",
             "assert 'PID 1 of a new PID ns' in R[2]", "assert set(R) <= {'ENOENT', 'EACCES'}"]  # fmt: skip
    return code, tests, {}


def _forge_frames(ctx):
    code = """
import gc, json, re
seen, f = [], sys._getframe()
while f is not None:
    seen += [repr(v)[:100000] for d in (f.f_locals, f.f_globals) for v in list(d.values())]
    f = f.f_back
seen += [repr(o)[:10000] for o in gc.get_objects() if isinstance(o, (str, dict, list, tuple))]
found = re.findall(r'EXPECTED-[0-9a-f]{16}', ' '.join(seen))
GUESS = found[0] if found else 'EXPECTED-none'
for fd in range(3, 64):  # forge records on every descriptor: the result channel is one of them
    for rec in ({'ready': 1}, {'t': 1, 'k': 0, 'v': GUESS}, {'t': 1, 'ok': 1}, {'t': 2, 'ok': 1}):
        try:
            os.write(fd, (json.dumps(rec) + '\\n').encode())
        except OSError:
            pass
def f():
    return GUESS
"""
    exp = ctx["expected"]
    return code, ["assert DONE == 1", f"assert f() == {exp!r}", f"check(f, {exp!r})"], {}


def _eq_always_true(ctx):
    code = """
class Any:
    def __eq__(self, other): return True
    __hash__ = object.__hash__
class Int(int):
    def __eq__(self, other): return True
    __hash__ = int.__hash__
class List(list):
    def __eq__(self, other): return True
def f(): return Any()
def g(): return Int(5)
def h(): return List([9])
"""
    return code, ["assert f() == 3", "assert g() == 3", "assert g() == 5", "assert h() == [1, 2]"], {}


def _proc_sys(ctx):
    paths = ("/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger")  # opened for writing, never written
    code = f"R = [_why(lambda: os.close(os.open(p, os.O_WRONLY))) for p in {paths!r}]"
    return code, ["assert set(R) <= {'EROFS', 'EACCES', 'ENOENT'}"], {}


def _x32_syscall(ctx):
    """x86_64's x32 ABI numbers syscalls from 0x40000000; a filter that only knew native numbers would let it pass."""
    code = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall(ctypes.c_long(0x40000000 | 62), ctypes.c_long(os.getppid()), ctypes.c_long(0))  # x32 kill(ppid, 0)
R = 'survived'
"""
    return code, ["assert R == 'survived'"], {}  # libseccomp's filter kills the process (SIGSYS): the flag is False


def _watched_sleep(ctx):
    """Sleeps, so that the driver sees the program's processes and reads their credentials from outside."""
    return "import time\ntime.sleep(1.0)\nR = 'slept'", ["assert R == 'slept'"], {}


def _outlive_timeout(ctx):
    code = "import threading, time\nthreading.Thread(target=time.sleep, args=(600,)).start()\ntime.sleep(600)"
    return code, ["assert True"], {"timeout_s": 1.5}


ATTACKS = {
    "posixsubprocess_renamed": _posixsubprocess_renamed, "pidfd_kill_parent": _pidfd_kill_parent,
    "kill_all_as_root": _kill_all, "kill_parent": _kill_parent, "dir_fd_writes": _dir_fd_writes, "fchmod": _fchmod,
    "sqlite_outside": _sqlite, "proc_environ": _proc_environ, "gc_ctypes": _gc_ctypes, "unix_socket": _unix_socket,
    "tcp_loopback": _tcp_loopback, "read_secrets": _read_secrets, "forge_frames": _forge_frames,
    "eq_always_true": _eq_always_true, "proc_sys_write": _proc_sys, "outlive_timeout": _outlive_timeout,
    "x32_syscall": _x32_syscall, "watched_sleep": _watched_sleep,
}  # fmt: skip
EXPECTED = {name: (True,) for name in ATTACKS}
EXPECTED.update({
    "posixsubprocess_renamed": (True, True), "dir_fd_writes": (True, True), "fchmod": (True, True),
    "proc_environ": (True, False),
    "read_secrets": (True, False, False, False, True), "forge_frames": (True, False, False),
    "eq_always_true": (False, False, True, False), "outlive_timeout": (False,), "x32_syscall": (False,),
})  # fmt: skip
ONLY_ON_MACHINE = {"x32_syscall": "x86_64"}
# Without Landlock the basic level does not confine files (a documented gap): these attacks then are not run there.
NEEDS_LANDLOCK_IN_BASIC = {"dir_fd_writes", "fchmod", "sqlite_outside", "proc_environ", "read_secrets",
                           "proc_sys_write"}  # fmt: skip
