"""Measure the sandbox's start-to-result latency against plain `python -c` of the same program.

Run: `PYTHONPATH=src python bench/bench_sandbox.py [--runs 30]`. Each figure is the wall time from
starting the process to having its result in hand, for a trivial program. The target is a
sandbox p50 of at most 150 ms.
"""

import argparse
import statistics
import subprocess
import sys
import time

from alignkit.apps.agents.sandbox import SANDBOX_PYTHON, check_available, run_code

TARGET_P50_MS = 150.0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def sandboxed() -> None:
    result = run_code("print(1)\nanswer = 2 + 2")
    assert result.ok and result.result == 4, result


def plain(python: str, flags: list[str]) -> None:
    done = subprocess.run([python, *flags, "-c", "print(1)\nanswer = 2 + 2"], capture_output=True)
    assert done.returncode == 0 and done.stdout == b"1\n", done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    reason = check_available()  # also pays the one-off probe before timing starts
    if reason is not None:
        print(f"sandbox unavailable: {reason}", file=sys.stderr)
        return 2

    cases = {
        "sandbox run_code (bwrap)": sandboxed,
        "unsandboxed run_code": lambda: run_code("print(1)\nanswer = 2 + 2", unsafe_no_sandbox=True),
        f"plain {SANDBOX_PYTHON} -I -S -c": lambda: plain(SANDBOX_PYTHON, ["-I", "-S"]),
        f"plain {SANDBOX_PYTHON} -c": lambda: plain(SANDBOX_PYTHON, []),
    }
    samples = {name: [] for name in cases}
    for name, fn in cases.items():
        fn()  # warm the page cache
    # Interleaved, so that drift in machine load affects every case alike.
    for i in range(args.runs):
        for name, fn in cases.items():
            samples[name].append(time_ms(fn))
        print(f"\rrun {i + 1}/{args.runs}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    baseline = statistics.median(samples[f"plain {SANDBOX_PYTHON} -c"])
    print(f"{'case':<36} {'p50 ms':>8} {'p95 ms':>8} {'p50 / plain':>12}")
    for name, values in samples.items():
        p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
        print(f"{name:<36} {p50:8.1f} {p95:8.1f} {p50 / baseline:11.2f}x")
    sandbox_p50 = percentile(samples["sandbox run_code (bwrap)"], 0.5)
    verdict = "meets" if sandbox_p50 <= TARGET_P50_MS else "MISSES"
    print(f"sandbox p50 {sandbox_p50:.1f} ms {verdict} the target of {TARGET_P50_MS:.0f} ms "
          f"({args.runs} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
