"""Runs one piece of untrusted code inside the sandbox; started by `sandbox.run_code`, never imported.

Its source is handed to the interpreter with `-c`, because the sandboxed user cannot see the
directory this file lives in. It must therefore stay standard-library only, self-contained, and
compatible with whatever Python 3 the system provides at /usr/bin/python3.

Protocol: argv[1] is a JSON object of limits plus the number of an inherited pipe (`result_fd`);
the code arrives on stdin; stdout and stderr belong to the code; one JSON line
`{"ok", "result", "error", "limit"}` goes to the result pipe when the code finishes. The code can
write to that pipe too, so the parent treats what it reads there as untrusted data: it can only
misreport its own run, which it controls anyway.

The resource limits set here are not a Python-level restriction: they are kernel rlimits with the
hard limit lowered, so the code cannot raise them again. The isolation itself (namespaces,
read-only file system, no network) was set up by bubblewrap before this interpreter started.
"""

import errno
import json
import linecache
import os
import resource
import signal
import sys
import traceback

FILENAME = "<sandbox>"


class CpuLimitExceeded(BaseException):
    """Raised from the SIGXCPU handler; a BaseException, so `except Exception` in the code misses it."""


def _on_sigxcpu(signum, frame):
    raise CpuLimitExceeded("CPU time limit exceeded")


def set_limits(limits):
    cpu_s = limits["cpu_s"]
    # The soft limit sends SIGXCPU (turned into an exception below); one second later the hard
    # limit sends SIGKILL, which catches code stuck in C where a Python handler cannot run.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits["max_processes"]:
        # Counted per uid *per user namespace* (Linux >= 5.14), and bubblewrap made a fresh user
        # namespace for this run, so this bounds this run only (see sandbox.py for the details).
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
    signal.signal(signal.SIGXCPU, _on_sigxcpu)


def limit_for(exc):
    """Name the limit an exception stands for, or None for an ordinary error in the code."""
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, CpuLimitExceeded):
        return "cpu"
    # fork/clone fail with EAGAIN when RLIMIT_NPROC is reached; threads report it as RuntimeError.
    if isinstance(exc, BlockingIOError) and exc.errno == errno.EAGAIN:
        return "processes"
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return "processes"
    return None


def json_or_repr(value):
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def run(code):
    """Execute the code; return the outcome as a dict (in every process that returns from here)."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    # Registering the source lets tracebacks, including ones the code prints itself, show its lines.
    linecache.cache[FILENAME] = (len(code), None, code.splitlines(True), FILENAME)
    # Released on MemoryError so that formatting the report has room to allocate.
    reserve = bytearray(1 << 20)
    try:
        exec(compile(code, FILENAME, "exec"), namespace)
    except SystemExit as exc:
        if exc.code in (None, 0):
            return {"ok": True, "result": json_or_repr(namespace.get("answer")), "error": None, "limit": None}
        return {"ok": False, "result": None, "error": "SystemExit: %s" % (exc.code,), "limit": None}
    except BaseException as exc:
        del reserve
        if isinstance(exc, MemoryError):
            namespace.clear()
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # hide this frame
        sys.stderr.write("".join(traceback.format_exception(type(exc), exc, tb)))
        error = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return {"ok": False, "result": None, "error": error, "limit": limit_for(exc)}
    return {"ok": True, "result": json_or_repr(namespace.get("answer")), "error": None, "limit": None}


def main():
    limits = json.loads(sys.argv[1])
    code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    set_limits(limits)
    main_pid = os.getpid()
    outcome = run(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if os.getpid() != main_pid:
        # A process the code forked ran off the end of the program: it must not report a result.
        os._exit(0 if outcome["ok"] else 1)
    report = (json.dumps(outcome) + "\n").encode()
    try:
        while report:
            report = report[os.write(limits["result_fd"], report):]
    except OSError:
        pass  # the code closed or broke the result pipe; the parent reports the missing result
    # _exit skips atexit handlers and joins of threads the code may have left behind.
    os._exit(0 if outcome["ok"] else 1)


if __name__ == "__main__":
    main()
