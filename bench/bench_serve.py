"""Benchmark `alignkit serve`: requests/s, time to first token (p50/p95) and aggregate tokens/s with
1, 8 and 32 concurrent streaming clients, each level sending the same requests; 1 client is the
same requests sent one at a time, and every figure is also given as a ratio against it.

    python bench/bench_serve.py [--model embedded] [--requests 32] [--max-tokens 32] [--levels 1,8,32]
                                [--threads 2] [--llama-cpp] [--quick]

The server runs in its own process (`alignkit serve`, OMP_NUM_THREADS=--threads); the clients are
asyncio + httpx in this process, streaming chat completions (temperature 0.7, a seed per request,
`ignore_eos` so every request decodes exactly --max-tokens tokens). Time to first token is from
sending the request to the first chunk with text or a token.

With --llama-cpp, and when llama-cpp-python is installed, the model is exported to GGUF (f16) and
the same requests go to `python -m llama_cpp.server` on that file (its own batching); it is said
plainly when llama-cpp-python is not installed. --quick: the tiny test model, 16 requests of 8 tokens.
Prints figures; it is not a test. Timings are noisy on a shared machine: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Where is my order? It was due on Monday.", "How do I return a pair of shoes that do not fit?",
             "How long does a refund take to reach my card?", "Can I change the delivery address after dispatch?",
             "What should I do if my parcel arrives damaged?", "Do you ship abroad?", "Can I cancel my order?",
             "I was charged twice for one order."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, threads: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


async def one_request(http: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", f"{url}/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if first is None and "content" in delta and "role" not in delta:  # the role chunk comes first
                    first = time.perf_counter()
    return {"ttft": (first or time.perf_counter()) - sent, "seconds": time.perf_counter() - sent, "tokens": tokens}


async def level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` requests spread over `clients` concurrent clients, each sending its share in turn."""
    async with httpx.AsyncClient(timeout=600) as http:
        await one_request(http, url, model, 10_000, 2)  # warm-up
        queue = list(range(requests))

        async def client():
            out = []
            while queue:
                out.append(await one_request(http, url, model, queue.pop(0), max_tokens))
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 3), "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 3),
            "tokens_per_request": statistics.mean(r["tokens"] for r in results)}


def run_levels(url, model, levels, requests, max_tokens, label):
    rows = [asyncio.run(level(url, model, c, requests, max_tokens)) for c in levels]
    base = rows[0]
    print(f"\n== {label}")
    print(f"{'clients':>7} {'req/s':>8} {'tok/s':>8} {'x 1-at-a-time':>14} {'TTFT p50':>9} {'TTFT p95':>9} {'tok/req':>8}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests_per_s']:>8.3f} {r['tokens_per_s']:>8.1f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>14.2f} {r['ttft_p50_s']:>9.3f} {r['ttft_p95_s']:>9.3f} "
              f"{r['tokens_per_request']:>8.1f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", action="store_true", help="also benchmark llama-cpp-python's server on the GGUF export")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model = args.model
    if args.quick:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_tiny_model

        model, args.requests, args.max_tokens = str(build_tiny_model(tmp / "tiny")), 16, 8
    results = {"model": model, "threads": args.threads, "max_tokens": args.max_tokens}

    port = free_port()
    proc = start([sys.executable, "-m", "alignkit.cli", "serve", "--model", model, "--port", str(port),
                  "--max-batch", str(max(levels)), "--max-queue", str(4 * args.requests), "--device", "cpu"],
                 port, args.threads, tmp / "alignkit.log")
    try:
        results["alignkit"] = run_levels(f"http://127.0.0.1:{port}/v1", model, levels, args.requests,
                                         args.max_tokens, f"alignkit serve ({model}, {args.threads} threads)")
    finally:
        proc.terminate()
        proc.wait()

    if args.llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("\nllama-cpp-python is not installed here: no llama.cpp comparison in this run")
        else:
            gguf = tmp / "model-f16.gguf"
            subprocess.run([sys.executable, "-m", "alignkit.cli", "export", "gguf", model, "--out", str(gguf),
                            "--quant", "f16"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            port = free_port()
            proc = start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                          "--n_threads", str(args.threads), "--n_ctx", "4096", "--model_alias", model],
                         port, args.threads, tmp / "llama_cpp.log")
            try:
                results["llama_cpp"] = run_levels(f"http://127.0.0.1:{port}/v1", model, levels, args.requests,
                                                  args.max_tokens, "llama-cpp-python server (same GGUF, f16)")
            finally:
                proc.terminate()
                proc.wait()
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
