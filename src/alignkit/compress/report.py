"""Every compressed variant beside the original, measured on the same held-out text.

    alignkit compress report VARIANT_DIR... --baseline M [--reward RM_DIR] --out DIR

Per model: parameters (total and non-zero), bytes of weight files on disk, peak memory and decoding
speed, perplexity on the shipped eval text, and, against the baseline, top-1 agreement and
KL(baseline || variant) per token; with a reward model, mean reward and toxicity of greedy replies
to a few shipped prompts.

Memory and speed come from a fresh subprocess per model that loads it and generates at batch 1 and
8 with a fixed thread count: its peak RSS (ru_maxrss) is what loading and running the model cost,
with nothing left over from the other models. Memory after load is given two ways: the bytes of the
model's parameters and buffers as they sit in memory (`weight_bytes`: int4 counts its packed bytes),
and the growth of the process's resident set from before loading (the model classes, torchao and
accelerate already imported) to after loading and one forward pass (which touches every weight, so
memory-mapped files count too), with freed heap returned to the system first (malloc_trim). Quality is measured in this process, one text at a
time, so padding never enters perplexity or KL.

Writes report.md (a table), metrics.json and size_vs_quality.png (bytes on disk against perplexity).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from alignkit.compress.prune import EVAL_TEXT
from alignkit.errors import AlignkitError
from alignkit.io import atomic_dir

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")
PROMPTS_FILE = Path(__file__).resolve().parents[1] / "data" / "examples" / "shop_prompts.txt"
SPEED_PROMPTS = ["Where is my order? It was due on Monday and the tracking page has not changed since.",
                 "How do I return a pair of shoes that do not fit?",
                 "Can you tell me how long a refund takes to reach my card?",
                 "Describe how to pack a fragile vase for shipping.",
                 "What should I do if my parcel arrives damaged?",
                 "Is it possible to change the delivery address after dispatch?",
                 "Write a short thank-you note to a customer.",
                 "Explain the difference between an exchange and a return."]

# Runs in a fresh interpreter: load one model, generate at batch 1 and 8, report speed and peak RSS.
SPEED_SNIPPET = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(args["threads"])
from alignkit.models import load_model
from alignkit.compress.report import settled_rss, weight_bytes
import accelerate, torchao, transformers.models.llama.modeling_llama, alignkit.compress.quantize  # noqa
rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rss_before = settled_rss()
model, tok = load_model(args["model"], device="cpu")
with torch.no_grad():
    model(input_ids=torch.tensor([[tok.eos_token_id or 0]]))
out = {"rss_after_imports": rss_imports, "load_rss_growth": settled_rss() - rss_before,
       "weight_bytes": weight_bytes(model)}
tok.padding_side = "left"
for batch in args["batches"]:
    enc = tok(args["prompts"][:batch], return_tensors="pt", padding=True)
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(**enc, max_new_tokens=args["new_tokens"], min_new_tokens=args["new_tokens"], **kw)
        seconds = time.perf_counter() - t0
    out[f"tokens_per_s_batch{batch}"] = round(batch * args["new_tokens"] / seconds, 2)
out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps(out))
"""


def model_dir(spec: str) -> Path:
    from alignkit.models.loading import resolve_base

    path = Path(spec)
    return path if path.is_dir() else resolve_base(spec)


def disk_bytes(directory: Path) -> int:
    """Bytes of the weight files (safetensors, .pt, .bin) directly in `directory`."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights_kind(directory: Path) -> str:
    """How a model directory stores its weights: 'float', or the method recorded in quantize.json."""
    path = Path(directory) / "quantize.json"
    if not path.is_file():
        return "float"
    recorded = json.loads(path.read_text())
    kind = recorded.get("method", "quantized")
    if recorded.get("group_size"):
        kind += f" g{recorded['group_size']}"
    if (Path(directory) / "int4_packed.pt").is_file():
        kind += " (2 per byte)"
    if recorded.get("embedding") in ("int8", "int4"):
        kind += f", {recorded['embedding']} embedding"
    return kind


def count_parameters(model) -> tuple[int, int]:
    """(total, non-zero) parameters; quantized tensors are counted by their logical shape, after dequantizing.

    Int4Linear keeps its weight in buffers (packed bytes), so each is counted once by its (out, in) shape.
    """
    from alignkit.compress.int4 import Int4Linear

    total = nonzero = 0
    for p in model.parameters():
        dense = p.dequantize() if type(p) not in (torch.Tensor, torch.nn.Parameter) else p
        total += p.numel()
        nonzero += int(torch.count_nonzero(dense.detach()))
    for m in model.modules():  # deduplicated: a tied int4 table is counted once
        if isinstance(m, Int4Linear):
            total += m.out_features * m.in_features
            nonzero += int(torch.count_nonzero(m.dequantize()))
    return total, nonzero


def weight_bytes(model) -> int:
    """Bytes that `model`'s parameters and buffers occupy, each storage once (tied weights share one).

    Tensor subclasses (torchao's quantized tensors) are counted by the plain tensors inside them.
    """
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        key = (t.untyped_storage().data_ptr(), t.dtype, t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    return total


def settled_rss() -> int:
    """This process's resident set in bytes (Linux), after garbage collection and after glibc has handed
    freed heap back to the system, so that temporaries of loading do not count."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure includes freed heap
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_speed(spec: str, threads: int = 2, new_tokens: int = 16, batches=(1, 8)) -> dict:
    """Peak RSS and tokens/s of a fresh process that loads `spec` and generates greedily."""
    import alignkit

    src = str(Path(alignkit.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    args = {"model": spec, "threads": threads, "new_tokens": new_tokens, "batches": list(batches),
            "prompts": SPEED_PROMPTS}
    proc = subprocess.run([sys.executable, "-c", SPEED_SNIPPET, json.dumps(args)], env=env,
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AlignkitError(f"model '{spec}': the speed/memory subprocess failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def token_rows(tokenizer, texts: list[str], max_length: int) -> list[torch.Tensor]:
    return [ids for ids in (tokenizer(t, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
                            for t in texts) if ids.shape[1] > 1]


@torch.no_grad()
def reference_logprobs(model, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The baseline's next-token log-probs per text, (T-1, V) each, kept for KL and agreement."""
    return [F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1) for ids in rows]


@torch.no_grad()
def quality(model, rows: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    """Perplexity, and top-1 agreement and mean KL(reference || model) per token."""
    nll = kl = agree = n = 0.0
    for ids, ref in zip(rows, reference):
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
        target = ids[0, 1:]
        nll += -logp.gather(1, target[:, None]).sum().item()
        kl += (ref.exp() * (ref - logp)).sum().item()
        agree += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
        n += target.numel()
    return {"perplexity": round(math.exp(nll / n), 4), "top1_agreement": round(agree / n, 4),
            "kl_vs_baseline": float(f"{kl / n:.4g}"), "eval_tokens": int(n)}


def reward_and_toxicity(model, tokenizer, reward_fn, prompts: list[str], max_new_tokens: int) -> dict:
    from alignkit.evaluate.judges import ToxicityJudge
    from alignkit.models import generate

    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens).texts
    rewards = reward_fn(prompts, completions)
    toxicity = ToxicityJudge().score(prompts, completions)
    return {"reward": round(sum(rewards) / len(rewards), 4), "toxicity": round(sum(toxicity) / len(toxicity), 4)}


def measure(specs: dict[str, str], *, eval_text: Path | None = None, max_length: int = 256, threads: int = 2,
            new_tokens: int = 16, reward: Path | None = None, reward_prompts: int = 8, speed: bool = True,
            progress: bool = True) -> list[dict]:
    """Metrics for each model in `specs` (name -> --model value); the first one is the baseline.

    speed=False skips the subprocess that measures peak memory and tokens/s (tens of seconds a model).
    """
    from tqdm.auto import tqdm

    from alignkit.compress.quantize import load_calibration_texts
    from alignkit.evaluate.rewards import load_reward
    from alignkit.models import load_model

    texts = load_calibration_texts(eval_text or EVAL_TEXT, limit=10_000)
    reward_fn = load_reward(Path(reward), "cpu")[0] if reward else None
    prompts = []
    if reward:
        from alignkit.data.prompts import load_prompts

        prompts = load_prompts(PROMPTS_FILE)[:reward_prompts]
    rows, reference, results = None, None, []
    for name, spec in tqdm(specs.items(), desc="report", unit="model", disable=not progress):
        model, tokenizer = load_model(spec, device="cpu")
        if rows is None:  # the baseline: every variant is compared with it on the same tokens
            rows = token_rows(tokenizer, texts, max_length)
            reference = reference_logprobs(model, rows)
        total, nonzero = count_parameters(model)
        row = {"name": name, "model": spec, "parameters": total, "nonzero_parameters": nonzero,
               "weight_bytes": weight_bytes(model),
               "weights": weights_kind(model_dir(spec)), "disk_bytes": disk_bytes(model_dir(spec)),
               **quality(model, rows, reference)}
        if reward_fn is not None:
            row.update(reward_and_toxicity(model, tokenizer, reward_fn, prompts, 32))
        del model
        if speed:
            row.update(measure_speed(spec, threads, new_tokens))
        results.append(row)
    base = results[0]
    for row in results:
        row["size_ratio"] = round(row["disk_bytes"] / base["disk_bytes"], 4)
        row["perplexity_ratio"] = round(row["perplexity"] / base["perplexity"], 4)
    return results


def markdown(results: list[dict], threads: int) -> str:
    """The side-by-side table, baseline first."""
    reward = "reward" in results[0]
    head = ["model", "weights", "params (M)", "non-zero (M)", "disk (MB)", "size ratio", "in memory (MB)",
            "RSS growth at load (MB)", "peak RSS (MB)",
            "tok/s b1", "tok/s b8", "perplexity", "ppl ratio", "top-1 agree", "KL"]
    head += ["reward", "toxicity"] if reward else []
    lines = ["# Compression report", "",
             f"Baseline: `{results[0]['model']}`. Perplexity, agreement and KL on {results[0]['eval_tokens']} "
             f"held-out tokens; speed with {threads} threads, greedy decoding, in a fresh process per model "
             "(timings are noisy on a shared machine).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def num(r, key, fmt, scale=1.0):
        return format(r[key] / scale, fmt) if key in r else "not measured"

    for r in results:
        cells = [r["name"], r["weights"], f"{r['parameters'] / 1e6:.2f}", f"{r['nonzero_parameters'] / 1e6:.2f}",
                 f"{r['disk_bytes'] / 1e6:.1f}", f"{r['size_ratio']:.3f}", f"{r['weight_bytes'] / 1e6:.1f}",
                 num(r, "load_rss_growth", ".0f", 1e6), num(r, "peak_rss", ".0f", 1e6),
                 num(r, "tokens_per_s_batch1", ".1f"), num(r, "tokens_per_s_batch8", ".1f"), f"{r['perplexity']:.3f}",
                 f"{r['perplexity_ratio']:.3f}", f"{r['top1_agreement']:.3f}", f"{r['kl_vs_baseline']:.3g}"]
        cells += [f"{r['reward']:.3f}", f"{r['toxicity']:.3f}"] if reward else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![size against perplexity](size_vs_quality.png)", ""]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.scatter(r["disk_bytes"] / 1e6, r["perplexity"])
        ax.annotate(r["name"], (r["disk_bytes"] / 1e6, r["perplexity"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel("perplexity on held-out text (lower is better)")
    ax.set_title("Size against quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(variants: list[Path], baseline: str, out_dir: Path, *, reward: Path | None = None,
           eval_text: Path | None = None, threads: int = 2, new_tokens: int = 16, speed: bool = True) -> list[dict]:
    """Measure baseline and variants, write report.md, metrics.json and the plot to `out_dir`."""
    if not variants:
        raise AlignkitError("give at least one variant directory")
    for v in variants:
        if not Path(v, "config.json").is_file():
            raise AlignkitError(f"{v}: not a model directory (no config.json)")
    names = [Path(v).name for v in variants]
    if len(set(names)) != len(names):
        names = [str(v) for v in variants]
    specs = {f"baseline ({Path(baseline).name or baseline})": baseline}
    specs.update({n: str(v) for n, v in zip(names, variants)})
    results = measure(specs, eval_text=eval_text, threads=threads, new_tokens=new_tokens, reward=reward,
                      speed=speed)
    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(results, indent=2))
        (tmp / "report.md").write_text(markdown(results, threads))
        plot(results, tmp / "size_vs_quality.png")
    return results
