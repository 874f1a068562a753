"""Run untrusted, model-generated Python in a separate process behind an OS security boundary.

The boundary is the kernel, not Python: an AST check or a module blocklist is never a boundary
(smolagents' in-process executor was escaped through exactly that: CVE-2025-5120, CVE-2025-9959).
Here the code may import anything, call `subprocess`, `ctypes` or walk `__subclasses__()`; all of
that happens inside a box it cannot leave:

* bubblewrap (`bwrap`) puts the interpreter in new user, mount, pid, network, IPC, UTS and cgroup
  namespaces (`--unshare-all`): no network at all (not even the host's 127.0.0.1), no view of host
  processes, so it cannot signal anything outside.
* The file system is read-only: a bind of `/usr` (plus the `/bin`, `/lib*` links and
  `/etc/ld.so.cache`), a fresh `/proc` and a minimal `/dev`. The only writable places are private,
  size-capped tmpfs mounts at `/tmp` (also the working directory) and `/dev/shm`, gone after the
  run. The user's home, `/root`, the project directory and the caller's working directory do not
  exist in the box.
* The environment is cleared (only PATH, HOME=/tmp and a UTF-8 locale are set), so no secret
  in the caller's environment reaches the code.
* `--new-session` detaches it from the caller's terminal (no TIOCSTI keystroke injection);
  `--die-with-parent` kills it if the caller dies; `--disable-userns` (when bwrap supports it)
  stops it from making user namespaces of its own, a common door to kernel bugs.
* When the caller is root, it first drops to the unprivileged user `nobody` (65534) with
  `setpriv`, because RLIMIT_NPROC never binds uid 0, not even inside a user namespace root made.
* Kernel resource limits (hard limits, so the code cannot raise them) are set by a tiny runner
  (`sandbox_runner.py`) before the code starts: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC
  (processes and threads), RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0.
* The caller enforces the wall-clock limit (SIGKILL to bwrap; the pid namespace dies with it)
  and reads stdout/stderr with a cap, killing the run when the cap is exceeded.

Limits and their defaults (all per run):

* `timeout_s=5.0` wall-clock seconds, counted from process start (bwrap and interpreter start-up,
  about 40 ms, included). Exceeded: limit="wall".
* `cpu_s=None` means ceil(timeout_s). RLIMIT_CPU takes whole seconds, so it is rounded up, at
  least 1; it counts per process. Exceeded: limit="cpu".
* `memory_mb=256` address space (RLIMIT_AS) per process; /tmp and /dev/shm are each capped at the
  same size (bwrap >= 0.7), and so is any single file written (RLIMIT_FSIZE). Exceeded:
  limit="memory" (MemoryError in the code).
* `max_processes=16` processes and threads of this run, counting the interpreter and bwrap's own
  init process, so the code can have about 14 more. Exceeded: limit="processes".
* `max_output_bytes=64_000` for each of stdout, stderr and the JSON of `answer`. Exceeded: the
  run is killed, the stream truncated at the cap, limit="output".

Caveats, stated plainly:

* RLIMIT_NPROC is counted per uid *per user namespace* since Linux 5.14, and bwrap makes a new
  user namespace for each run, so several sandboxes running at once do not share the budget. On
  older kernels the count covers every process of uid 65534 (or of the caller, when not root) on
  the machine, so concurrent runs and other `nobody` processes eat into each other's budget.
* RLIMIT_AS is per process, so a run may use up to about max_processes x memory_mb in total
  (plus the two tmpfs mounts). A cgroup would bound the sum; it needs cgroup delegation we do not
  assume. bwrap older than 0.7 cannot cap the tmpfs mounts at all; the wall clock bounds them.
* The box sees the kernel (system calls are not filtered with seccomp) and read-only /usr.
* Requires Linux with bubblewrap (`apt-get install bubblewrap`), setpriv when run as root
  (util-linux), /usr/bin/python3 (the code gets the system's Python and standard library only),
  and unprivileged user namespaces (some distributions restrict them: on Ubuntu 24.04 see
  `sysctl kernel.apparmor_restrict_unprivileged_userns`). `check_available()` tells you why not.

`unsafe_no_sandbox=True` runs the same runner in a plain subprocess with the same rlimits (except
RLIMIT_NPROC, which would count all of the caller's processes) and no isolation: for trusted code
only. Its result has `sandboxed=False`.

Command line: `python -m alignkit.apps.agents.sandbox [--timeout S] [--memory-mb M]
[--unsafe-no-sandbox] < code.py` prints the result as one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SANDBOX_PYTHON = "/usr/bin/python3"
SANDBOX_UID = 65534  # `nobody`: what root drops to, so that RLIMIT_NPROC applies
OPEN_FILES = 256
# The runner travels as `-c` source: the sandboxed user cannot read this package's directory.
_RUNNER_SOURCE = Path(__file__).with_name("sandbox_runner.py").read_text()
_INSTALL_HINT = "install it with `apt-get install -y bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap`"


class SandboxUnavailable(RuntimeError):
    """The OS boundary cannot be set up here, so untrusted code must not run."""


@dataclass
class SandboxResult:
    ok: bool
    """True when the code ran to the end (or exited with status 0) within every limit."""
    stdout: str
    stderr: str
    """The code's stderr: tracebacks of failed code end up here."""
    result: Any = None
    """The value of the code's `answer` variable if it is JSON-serialisable, else its repr; None if unset."""
    error: str | None = None
    """One line saying what went wrong (e.g. "ZeroDivisionError: division by zero"); None when ok."""
    limit: str | None = None
    """The limit that stopped the run: "cpu", "wall", "memory", "processes", "output", or None."""
    sandboxed: bool = True
    """False only for runs made with unsafe_no_sandbox=True, which had no isolation."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@functools.cache
def _bwrap_help(bwrap: str) -> str:
    # Optional flags (--size from bwrap 0.7, --disable-userns from 0.8) are used when present.
    return subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout


def _sandbox_command(bwrap: str, tmp_bytes: int) -> list[str]:
    """The command line that starts SANDBOX_PYTHON inside bubblewrap; the runner arguments follow."""
    command = []
    if os.geteuid() == 0:
        uid = str(SANDBOX_UID)
        command += [shutil.which("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    help_text = _bwrap_help(bwrap)
    command += [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session"]
    if "--disable-userns" in help_text:
        command += ["--disable-userns"]
    command += ["--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
                "--setenv", "HOME", "/tmp", "--setenv", "LC_ALL", "C.UTF-8"]
    command += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        # Merged-/usr systems have these as links into /usr; older ones have real directories.
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    command += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev"]
    # /tmp, and /dev/shm for multiprocessing's semaphores, are the only writable places. A tmpfs
    # lives in host RAM outside RLIMIT_AS, so each gets its own cap where bwrap can set one.
    for writable in ("/tmp", "/dev/shm"):
        if "--size" in help_text:
            command += ["--size", str(tmp_bytes)]
        command += ["--tmpfs", writable]
    # bwrap builds the root and /dev on tmpfs mounts of its own; without these they stay writable
    # (and unbounded), so code could fill host memory through files in / or /dev.
    command += ["--remount-ro", "/dev", "--remount-ro", "/"]
    command += ["--chdir", "/tmp", SANDBOX_PYTHON, "-I", "-S", "-B"]
    return command


@functools.cache
def check_available() -> str | None:
    """Return None when untrusted code can run behind the OS boundary here, else the reason why not.

    Checked once per process: it finds the tools, then starts one trivial sandbox (~40 ms).
    """
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux namespaces (bubblewrap); this is {sys.platform}"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return f"bubblewrap (`bwrap`) is not installed; {_INSTALL_HINT}"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return ("running as root needs `setpriv` (util-linux) to drop to an unprivileged user before bwrap, "
                "because process limits do not bind root; install it with `apt-get install -y util-linux`")
    python = Path(SANDBOX_PYTHON)
    if not python.exists() or not python.resolve().is_relative_to("/usr"):
        return (f"{SANDBOX_PYTHON} (the system Python the sandbox runs, from /usr) is missing; "
                "install it with `apt-get install -y python3`")
    probe = subprocess.run(_sandbox_command(bwrap, 1 << 20) + ["-c", "pass"], capture_output=True,
                           text=True, env={}, stdin=subprocess.DEVNULL, timeout=30)
    if probe.returncode != 0:
        return (f"bubblewrap is installed but could not start a sandbox (exit {probe.returncode}): "
                f"{probe.stderr.strip()[-500:]}. Unprivileged user namespaces may be disabled: check "
                "`sysctl kernel.unprivileged_userns_clone` (Debian) or "
                "`kernel.apparmor_restrict_unprivileged_userns` (Ubuntu 24.04+), and inside containers "
                "that the runtime allows user namespaces")
    return None


def run_code(
    code: str,
    *,
    timeout_s: float = 5.0,
    cpu_s: float | None = None,
    memory_mb: int = 256,
    max_processes: int = 16,
    max_output_bytes: int = 64_000,
    unsafe_no_sandbox: bool = False,
) -> SandboxResult:
    """Run `code` as a Python program behind the OS boundary and report what happened.

    Limits are described in the module docstring. Raises SandboxUnavailable (saying why and how to
    fix it) when the boundary cannot be set up, unless unsafe_no_sandbox=True, which runs the code
    in a plain subprocess with no isolation and must only be used for trusted code.
    """
    cpu_limit_s = max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s))
    memory_bytes = memory_mb * 1024 * 1024
    limits = {"cpu_s": cpu_limit_s, "memory_bytes": memory_bytes, "file_bytes": memory_bytes,
              "open_files": OPEN_FILES, "max_processes": 0 if unsafe_no_sandbox else max_processes}
    if unsafe_no_sandbox:
        with tempfile.TemporaryDirectory(prefix="alignkit-unsafe-") as workdir:
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LC_ALL": "C.UTF-8"}
            return _run([sys.executable, "-I", "-B"], code, limits, env, workdir, timeout_s, max_output_bytes,
                        sandboxed=False)
    reason = check_available()
    if reason is not None:
        raise SandboxUnavailable(f"cannot run untrusted code: {reason}. (For trusted code only, "
                                 "unsafe_no_sandbox=True runs it without isolation.)")
    command = _sandbox_command(shutil.which("bwrap"), memory_bytes)
    return _run(command, code, limits, {}, "/", timeout_s, max_output_bytes, sandboxed=True)


def _run(command: list[str], code: str, limits: dict, env: dict, cwd: str, timeout_s: float,
         max_output_bytes: int, *, sandboxed: bool) -> SandboxResult:
    started = time.monotonic()
    deadline = started + timeout_s
    result_r, result_w = os.pipe()
    try:
        limits = {**limits, "result_fd": result_w}
        proc = subprocess.Popen(command + ["-c", _RUNNER_SOURCE, json.dumps(limits)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(result_w,),
                                env=env, cwd=cwd, start_new_session=True)
    except BaseException:
        os.close(result_r)
        raise
    finally:
        os.close(result_w)
    try:
        streams, exceeded, timed_out = _communicate(proc, code.encode("utf-8", "surrogatepass"), result_r,
                                                    deadline, max_output_bytes)
    finally:
        # Kill before reaping: while the leader is an unreaped zombie its group id cannot be reused.
        # In the sandbox this takes bwrap down, and with it the whole pid namespace.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
        os.close(result_r)

    elapsed_s = time.monotonic() - started
    stdout = streams["stdout"].decode("utf-8", "replace")
    stderr = streams["stderr"].decode("utf-8", "replace")
    done = functools.partial(SandboxResult, stdout=stdout, stderr=stderr, sandboxed=sandboxed)
    if exceeded is not None:
        what = "the JSON of `answer`" if exceeded == "result" else exceeded
        return done(ok=False, error=f"{what} exceeded {max_output_bytes} bytes; the run was killed",
                    limit="output")
    if timed_out:
        return done(ok=False, error=f"wall-clock limit of {timeout_s:g} s exceeded; the run was killed",
                    limit="wall")
    report = _last_report(streams["result"])
    status_code = proc.returncode
    if report is not None:
        ok = bool(report.get("ok")) and status_code == 0
        return done(ok=ok, result=report.get("result"), error=report.get("error"),
                    limit=report.get("limit"))
    # No report: the process died from a signal or called os._exit itself. bwrap passes a
    # signal death on as 128 + signal number; a plain subprocess shows it as a negative code.
    signum = -status_code if status_code < 0 else status_code - 128 if status_code > 128 else None
    cpu_s = limits["cpu_s"]
    if signum == signal.SIGXCPU:
        return done(ok=False, error=f"CPU time limit of {cpu_s} s exceeded; the process was killed",
                    limit="cpu")
    # The hard CPU limit (one second after the soft one) kills with SIGKILL, which also has other
    # causes; bwrap keeps the code's CPU usage from us, so the run's duration is the evidence.
    if signum == signal.SIGKILL and elapsed_s >= cpu_s + 1:
        return done(ok=False, error=f"killed by SIGKILL after {elapsed_s:.1f} s, most likely by the hard "
                    f"CPU time limit ({cpu_s} s + 1 s grace for code that ignores SIGXCPU)", limit="cpu")
    if status_code == 0:
        return done(ok=True)
    if signum is not None and signum in signal.valid_signals():
        cause = f"was killed by signal {signal.Signals(signum).name}"
    else:
        cause = f"exited with status {status_code}"
    return done(ok=False, error=f"the process {cause} before reporting a result")


def _communicate(proc: subprocess.Popen, stdin_bytes: bytes, result_fd: int, deadline: float,
                 cap: int) -> tuple[dict[str, bytes], str | None, bool]:
    """Feed stdin and read stdout, stderr and the result pipe, each capped at `cap` bytes.

    Returns (bytes per stream, the stream that exceeded its cap or None, whether the deadline
    passed). Stops at end of all streams, or when the process has exited and nothing is left to
    read (a leftover child of an unsandboxed run might hold a pipe open forever).
    """
    names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr", result_fd: "result"}
    buffers = {name: bytearray() for name in names.values()}
    selector = selectors.DefaultSelector()
    for fd in names:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    stdin_fd = proc.stdin.fileno()
    pending = memoryview(stdin_bytes)
    os.set_blocking(stdin_fd, False)
    selector.register(stdin_fd, selectors.EVENT_WRITE)
    try:
        while len(selector.get_map()) > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {k: bytes(v) for k, v in buffers.items()}, None, True
            events = selector.select(min(remaining, 0.1))
            for key, _ in events:
                if key.fd == stdin_fd:
                    try:
                        pending = pending[os.write(stdin_fd, pending[:65536]):]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(stdin_fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                name = names[key.fd]
                buffers[name] += chunk
                if len(buffers[name]) > cap:
                    del buffers[name][cap:]
                    return {k: bytes(v) for k, v in buffers.items()}, name, False
            if not events and _has_exited(proc.pid):
                break
        # Every pipe is closed, but the process may still be running (an unsandboxed run can close
        # them early) or be an instant away from exiting: wait for it, within the deadline.
        pause = 0.0005
        while not _has_exited(proc.pid):
            if time.monotonic() >= deadline:
                return {k: bytes(v) for k, v in buffers.items()}, None, True
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
        return {k: bytes(v) for k, v in buffers.items()}, None, False
    finally:
        selector.close()


def _has_exited(pid: int) -> bool:
    # WNOWAIT leaves the process unreaped, so its group id stays reserved for the final killpg.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _last_report(raw: bytes) -> dict | None:
    # The runner's report is the last line; anything before it was written by the code itself.
    for line in reversed(raw.splitlines()):
        try:
            report = json.loads(line)
        except ValueError:
            continue
        return report if isinstance(report, dict) else None
    return None


def cli_run(timeout: float = 5.0, memory_mb: int = 256, unsafe_no_sandbox: bool = False) -> int:
    """Read code on stdin, run it, print the result as JSON; return the exit status for the shell.

    0 when the code ran fine, 1 when it failed or hit a limit, 2 when the sandbox is unavailable
    (the reason goes to stderr and nothing is run).
    """
    code = sys.stdin.read()
    try:
        result = run_code(code, timeout_s=timeout, memory_mb=memory_mb, unsafe_no_sandbox=unsafe_no_sandbox)
    except SandboxUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.to_json())
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignkit.apps.agents.sandbox",
                                     description="Run Python code read on stdin in the sandbox; print JSON.")
    parser.add_argument("--timeout", type=float, default=5.0, help="wall-clock limit in seconds (default 5)")
    parser.add_argument("--memory-mb", type=int, default=256,
                        help="memory limit per process in MiB (default 256)")
    parser.add_argument("--unsafe-no-sandbox", action="store_true",
                        help="run without isolation: only for trusted code")
    args = parser.parse_args(argv)
    return cli_run(args.timeout, args.memory_mb, args.unsafe_no_sandbox)


if __name__ == "__main__":
    sys.exit(main())
