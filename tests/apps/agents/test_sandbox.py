"""Hostile code run through the sandbox must be contained, reported, and leave the host unaffected.

Each hostile test runs code that tries to reach a canary file (one under the system temp dir, one
inside the project), a TCP listener on the host's 127.0.0.1, host processes or the environment,
and then checks that the canaries are unchanged, no file appeared beside them and the listener
received nothing. The canaries are world-readable and world-writable, so only the OS boundary
(not file permissions) keeps the code away from them; `test_unsafe_mode_is_not_a_boundary` is the
control that shows the same probes do reach them without the sandbox.
"""

import json
import os
import platform
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from alignkit.apps.agents import sandbox
from alignkit.apps.agents.sandbox import SandboxUnavailable, check_available, run_code

SECRET = "canary-7f3a9c-do-not-leak"
# A string only the runner's `-c` source contains: it finds sandboxed interpreters in host /proc.
RUNNER_MARK = b"CpuLimitExceeded"


@pytest.fixture(scope="module")
def boundary():
    reason = check_available()
    if reason is None:
        return
    message = f"SANDBOX BOUNDARY NOT TESTED, bubblewrap sandbox unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI installs bubblewrap; a skip there would hide a broken boundary
    pytest.skip(message)


class Host:
    """The things hostile code must not touch, and the check that it did not."""

    def __init__(self, canary_dirs: list[Path], listener: socket.socket):
        self.canary_dirs = canary_dirs
        self.canaries = [d / "canary.txt" for d in canary_dirs]
        self.listener = listener
        self.port = listener.getsockname()[1]

    def assert_unaffected(self):
        for directory, canary in zip(self.canary_dirs, self.canaries):
            assert canary.read_text() == SECRET, f"{canary} was changed"
            appeared = sorted(p.name for p in directory.iterdir())
            assert appeared == ["canary.txt"], f"a file appeared in {directory}"
        readable, _, _ = select.select([self.listener], [], [], 0)
        assert not readable, "the host's 127.0.0.1 listener received a connection"
        assert _wait_for_no_sandbox_processes() == [], "sandboxed processes outlived the run"


@pytest.fixture(scope="module")
def host():
    project_dir = Path(tempfile.mkdtemp(prefix=".sandbox-canary-", dir=Path(__file__).parent))
    temp_dir = Path(tempfile.mkdtemp(prefix="sandbox-canary-"))
    for directory in (project_dir, temp_dir):
        # Open to everyone, so that a failed read or write can only be the boundary's doing.
        directory.chmod(0o777)
        (directory / "canary.txt").write_text(SECRET)
        (directory / "canary.txt").chmod(0o666)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield Host([project_dir, temp_dir], listener)
    listener.close()
    shutil.rmtree(project_dir)
    shutil.rmtree(temp_dir)


def _sandbox_processes() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if RUNNER_MARK in cmdline:
                found.append(int(entry))
    return found


def _wait_for_no_sandbox_processes(timeout_s: float = 3.0) -> list[int]:
    # The pid namespace is torn down asynchronously after bwrap is killed; give it a moment.
    deadline = time.monotonic() + timeout_s
    while (left := _sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def _leaked(result, *secrets) -> bool:
    seen = result.stdout + result.stderr + json.dumps(result.result) + str(result.error)
    return any(s in seen for s in secrets)


def _probe_code(host: Host) -> str:
    """Python source that tries to read every canary and connect to the listener; answer = what happened."""
    return f"""
import socket
canaries = {[str(c) for c in host.canaries]!r}
answer = {{}}
for path in canaries:
    try:
        answer[path] = open(path).read()
    except OSError as exc:
        answer[path] = type(exc).__name__
s = socket.socket()
s.settimeout(1)
try:
    s.connect(("127.0.0.1", {host.port}))
    answer["connect"] = "connected"
except OSError as exc:
    answer["connect"] = type(exc).__name__
"""


# --- ordinary code ---------------------------------------------------------------------------


def test_runs_code_and_returns_answer(boundary):
    result = run_code("print('hello')\nanswer = {'sum': 2 + 2}")
    assert result.ok and result.sandboxed
    assert result.stdout == "hello\n"
    assert result.result == {"sum": 4}
    assert result.error is None and result.limit is None
    assert json.loads(result.to_json())["result"] == {"sum": 4}


def test_exception_gives_traceback_and_one_line_error(boundary):
    result = run_code("x = 1\ny = x / 0\n")
    assert not result.ok and result.limit is None
    assert result.error == "ZeroDivisionError: division by zero"
    assert "line 2" in result.stderr and "y = x / 0" in result.stderr  # the code's own source line


def test_syntax_error_is_reported(boundary):
    result = run_code("def broken(:\n")
    assert not result.ok
    assert result.error.startswith("SyntaxError")


def test_answer_that_is_not_json_comes_back_as_repr(boundary):
    result = run_code("answer = {1, 2}")
    assert result.ok and result.result == "{1, 2}"


@pytest.mark.parametrize("code, ok", [("import sys; sys.exit(0)", True), ("import sys; sys.exit(3)", False)])
def test_exit_status_decides_ok(boundary, code, ok):
    assert run_code(code).ok is ok


def test_large_code_arrives_whole(boundary):
    code = "# " + "x" * 500_000 + "\nanswer = 'end'"  # larger than a pipe buffer
    assert run_code(code).result == "end"


# --- hostile code ----------------------------------------------------------------------------


def test_cannot_read_host_files(boundary, host):
    code = _probe_code(host) + f"""
import os
answer["exists"] = [p for p in ({str(Path.cwd())!r}, {str(Path(__file__).parent)!r}, {str(Path.home())!r},
                                "/root", "/home", "/etc/passwd", "/etc/shadow") if os.path.exists(p)]
answer["root"] = sorted(os.listdir("/"))
"""
    result = run_code(code)
    assert result.ok, result.stderr
    for canary in host.canaries:
        assert result.result[str(canary)] == "FileNotFoundError"
    assert result.result["exists"] == []
    allowed = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr"}
    assert set(result.result["root"]) <= allowed
    assert not _leaked(result, SECRET)
    host.assert_unaffected()


def test_cannot_write_outside_its_private_tmp(boundary, host):
    host_tmp_marker = Path(tempfile.gettempdir()) / f"sandbox-escape-{os.getpid()}"
    targets = [str(c) for c in host.canaries] + [str(d / "new.txt") for d in host.canary_dirs]
    targets += ["/usr/new.txt", "/new.txt", "/etc/new.txt", "/dev/new.txt", "/proc/new.txt"]
    code = f"""
answer = {{}}
for path in {targets!r}:
    try:
        with open(path, "w") as f:
            f.write("owned")
        answer[path] = "written"
    except OSError as exc:
        answer[path] = type(exc).__name__
with open({str(host_tmp_marker)!r}, "w") as f:
    f.write("only in the sandbox")
answer["tmp"] = open({str(host_tmp_marker)!r}).read()
"""
    result = run_code(code)
    assert result.ok, result.stderr
    assert result.result.pop("tmp") == "only in the sandbox"
    assert "written" not in result.result.values(), result.result
    assert not host_tmp_marker.exists(), "the sandbox's /tmp is the host's /tmp"
    host.assert_unaffected()


def test_no_network(boundary, host):
    code = _probe_code(host) + """
import socket
try:
    socket.create_connection(("1.1.1.1", 53), timeout=1)
    answer["internet"] = "connected"
except OSError as exc:
    answer["internet"] = type(exc).__name__
answer["interfaces"] = [name for _, name in socket.if_nameindex()]
"""
    result = run_code(code)
    assert result.ok, result.stderr
    assert result.result["connect"] != "connected"
    assert result.result["internet"] != "connected"
    assert result.result["interfaces"] == ["lo"]
    host.assert_unaffected()


# Each one runs inside the box (that is allowed); none may reach the host.
ESCAPES = {
    "subprocess": """
import subprocess, sys
out = subprocess.run(["/bin/sh", "-c", "cat {c0} {c1}; id"], capture_output=True, text=True)
connect = "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
net = subprocess.run([sys.executable, "-c", connect], capture_output=True, text=True)
answer = [out.stdout, out.stderr, net.returncode]
""",
    "os.system": """
import os, sys
connect = "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
answer = [os.system("cat {c0} {c1} > /tmp/out 2>&1"), open("/tmp/out").read(),
          os.system(sys.executable + ' -c "' + connect + '"')]
""",
    "ctypes": """
import ctypes, ctypes.util
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
answer = [libc.open(b"{c0}", 0), libc.open(b"{c1}", 0), ctypes.get_errno(), libc.system(b"cat {c0}")]
""",
    "subclasses walk": """
found = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "_wrap_close"]
system = found[0].__init__.__globals__["system"]
popen = found[0].__init__.__globals__["popen"]
answer = [system("cat {c0} {c1}"), popen("cat {c0} {c1} 2>&1").read()]
""",
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_attempts_stay_inside(boundary, host, name):
    code = ESCAPES[name].format(c0=host.canaries[0], c1=host.canaries[1], port=host.port)
    result = run_code(code)
    assert result.limit is None, result
    assert not _leaked(result, SECRET), f"{name} read a canary: {result}"
    host.assert_unaffected()


def test_fork_bomb_hits_process_limit(boundary, host):
    started = time.monotonic()
    result = run_code("import os\nwhile True:\n    os.fork()\n", timeout_s=5)
    assert result.limit == "processes", result
    assert not result.ok
    assert time.monotonic() - started < 4
    host.assert_unaffected()


def test_fork_bomb_that_ignores_errors_is_stopped_by_wall_clock(boundary, host):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_code(code, timeout_s=1)
    assert result.limit == "wall"
    host.assert_unaffected()  # includes: no process of the bomb survives


def test_memory_bomb_hits_memory_limit(boundary, host):
    result = run_code("hoard = []\nwhile True:\n    hoard.append(' ' * 10**6)\n", memory_mb=64)
    assert result.limit == "memory" and result.error == "MemoryError"
    host.assert_unaffected()


def test_infinite_loop_hits_cpu_limit(boundary, host):
    started = time.monotonic()
    result = run_code("while True:\n    pass\n", cpu_s=1, timeout_s=10)
    assert result.limit == "cpu"
    assert time.monotonic() - started < 6  # 1 s of CPU takes longer on a loaded machine
    host.assert_unaffected()


def test_sleep_hits_wall_limit_and_leaves_no_process(boundary, host):
    # The child escapes to its own session; the pid namespace must take it down all the same.
    code = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],\n"
            "                 start_new_session=True)\n"
            "time.sleep(600)\n")
    started = time.monotonic()
    result = run_code(code, timeout_s=1)
    assert result.limit == "wall" and not result.ok
    assert time.monotonic() - started < 2
    host.assert_unaffected()


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_truncated_and_killed(boundary, host, stream):
    code = f"import sys\nwhile True:\n    sys.{stream}.write('x' * 100_000)\n"
    result = run_code(code, max_output_bytes=10_000)
    assert result.limit == "output"
    assert len(getattr(result, stream)) == 10_000
    host.assert_unaffected()


def test_huge_answer_hits_output_limit(boundary):
    result = run_code("answer = 'x' * 1_000_000", max_output_bytes=10_000)
    assert result.limit == "output" and result.result is None


@pytest.mark.parametrize("trick", [
    "os.kill(os.getppid(), signal.SIGKILL)",
    "os.kill(-1, signal.SIGKILL)",
    "os.killpg(0, signal.SIGKILL)",
    "os.kill({bystander}, signal.SIGKILL)",
    "[os.kill(pid, signal.SIGKILL) for pid in range(1, 5000) if pid != os.getpid()]",
])
def test_signal_tricks_do_not_reach_the_host(boundary, host, trick):
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        attempt = trick.format(bystander=bystander.pid)
        code = f"import os, signal\ntry:\n    {attempt}\nexcept OSError:\n    pass\n"
        run_code(code)
        assert bystander.poll() is None, "a host process was killed from inside the sandbox"
        host.assert_unaffected()
    finally:
        bystander.kill()
        bystander.wait()


def test_environment_secrets_are_not_visible(boundary, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_TEST_API_KEY", SECRET)
    code = """
import os
answer = [dict(os.environ)]
for path in ("/proc/self/environ", "/proc/1/environ"):
    try:
        answer.append(open(path, "rb").read().decode(errors="replace"))
    except OSError as exc:
        answer.append(type(exc).__name__)
"""
    result = run_code(code)
    assert result.ok, result.stderr
    assert not _leaked(result, SECRET, "ALIGNKIT_TEST_API_KEY")
    assert set(result.result[0]) <= {"PATH", "HOME", "LC_ALL", "LC_CTYPE", "PWD"}


@pytest.mark.skipif(tuple(int(p) for p in platform.release().split(".")[:2]) < (5, 14),
                    reason="RLIMIT_NPROC is counted per user namespace only since Linux 5.14")
def test_concurrent_runs_have_separate_process_budgets(boundary):
    # 3 runs x 11 live processes exceed one budget of 16, but each run is within its own.
    code = """
import os, time
children = []
for _ in range(10):
    pid = os.fork()
    if pid == 0:
        time.sleep(0.5)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
answer = len(children)
"""
    results = [None] * 3

    def one(i):
        results[i] = run_code(code, timeout_s=10)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.result for r in results] == [10, 10, 10], results


# --- without the boundary --------------------------------------------------------------------


def test_unsafe_mode_is_not_a_boundary(host):
    """The control for the hostile tests: without the sandbox the same probe reaches the canaries."""
    result = run_code(_probe_code(host), unsafe_no_sandbox=True)
    assert result.ok and result.sandboxed is False
    assert all(result.result[str(c)] == SECRET for c in host.canaries)
    assert result.result["connect"] == "connected"
    host.listener.accept()[0].close()  # consume it, so later checks see a clean listener


def test_unsafe_mode_still_enforces_wall_clock():
    result = run_code("import time\ntime.sleep(60)", timeout_s=0.5, unsafe_no_sandbox=True)
    assert result.limit == "wall" and result.sandboxed is False


def test_refuses_to_run_without_the_boundary(monkeypatch):
    monkeypatch.setattr(sandbox, "check_available", lambda: "bubblewrap (`bwrap`) is not installed")
    with pytest.raises(SandboxUnavailable, match="bwrap.*not installed.*unsafe_no_sandbox"):
        run_code("answer = 1")


def test_check_available_says_how_to_install_bwrap(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    reason = check_available.__wrapped__()  # bypass the per-process cache
    assert "apt-get install -y bubblewrap" in reason


# --- command line ----------------------------------------------------------------------------


def test_command_line_prints_json(boundary):
    src_dir = Path(sandbox.__file__).parents[3]
    env = {**os.environ, "PYTHONPATH": str(src_dir)}
    done = subprocess.run([sys.executable, "-m", "alignkit.apps.agents.sandbox", "--timeout", "3"],
                          input="print('hi')\nanswer = 6 * 7\n", capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert {k: printed[k] for k in ("ok", "stdout", "result", "error", "limit")} == {
        "ok": True, "stdout": "hi\n", "result": 42, "error": None, "limit": None}
