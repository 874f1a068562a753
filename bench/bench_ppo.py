"""Benchmark alignkit's PPO and GRPO steps against TRL's online RL trainers on the same work: seconds
per step, completion tokens/s and peak memory, each as a ratio against the peer measured in the same run.

    python bench/bench_ppo.py [--steps 4] [--models tiny,embedded] [--threads 2] [--rounds 1] [--quick]
                              [--trl-ppo-path DIR] [--before DIR] [--sides S,...] [--dtype bfloat16|auto]
                              [--shape demo] [--omp-wait-policy default]

Sides, each run in a fresh process, one after the other:
  alignkit PPO              the recipe, rollouts on the rollout engine
  alignkit PPO, plain gen.  the same recipe with rollouts from transformers' `model.generate` on the
                            PEFT-wrapped policy, as before the engine: PPO before/after in one run
  alignkit PPO, older code  the PPO recipe of an older checkout of this repository (--before DIR, e.g.
                            a `git worktree` of the commit before the rollout engine): this script's
                            alignkit PPO side with DIR/src first on the path, so the same settings
                            drive the older sources: the whole step before/after in one run
  alignkit GRPO             the GRPO recipe: 1 prompt x 8 completions per step, as TRL's GRPO below
  TRL 1.16 GRPOTrainer      TRL's current online trainer (TRL dropped PPO after 1.10)
  TRL 1.10 PPOTrainer       `trl.experimental.ppo`; it needs a TRL 1.10 installed apart from 1.16, e.g.
                            `pip install --no-deps --target DIR trl==1.10.0`, given as --trl-ppo-path DIR

The same for every side: the shipped shop prompts, the reward configs/judge_safety.yaml (the same
Python function is called), 8 completions per step of at most 32 new tokens sampled at temperature
1, LoRA r 8 / alpha 16 on q,k,v,o, float32 (--dtype bfloat16: alignkit's `dtype: bfloat16`, the frozen
base's products in bfloat16, against TRL's `bf16=True`, autocast; --dtype auto: each side's default, which
on a CPU with AMX is alignkit's bfloat16 frozen products), one optimisation pass over the 8 completions per step
(one batch, no accumulation), KL to the adapter-disabled base on. `--shape demo` runs the demo's PPO
settings instead (configs/demo/ppo.yaml: its training prompts, at most 48 new tokens at temperature 0.7,
LoRA r 16 / alpha 32 on all seven projections; the reward stays the same judge function). Not the
same, by design of the algorithms: PPO scores 8 prompts once each, learns a value head and uses GAE advantages (with one
epoch and one minibatch, as here, its update reuses the rollout's forward pass for the old log-probs
and values, as GRPO with num_iterations 1 does); GRPO samples 8 completions of one prompt and uses
group-normalised rewards as advantages; alignkit GRPO and TRL GRPO do the same work (KL as k3 in the
loss with beta 0.05, one iteration, token-level loss). TRL's PPO keeps a separate critic network (here given the
same LoRA), so it runs one more backbone per forward pass than alignkit, whose value head shares the
policy's backbone.

Step 1 of each run is warm-up and left out. With --rounds N every figure is the median over the rounds,
and each round's ratio of completion tokens/s is printed as well: a round runs the sides back to back,
so its ratio shares that round's load. Peak memory is the child process's peak resident set
(ru_maxrss), model loading included. Every side gets the same OMP_NUM_THREADS and, unless set
otherwise, OMP_WAIT_POLICY=PASSIVE (see run_side; --omp-wait-policy default leaves OpenMP's own
default, what a user's run gets: on a quiet machine that is the fairer figure, since passive waiting
slows loops of many small products, the decode loop most). Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import _ppo_common as common  # the helper modules live beside this script

SIDES = {"alignkit": "alignkit PPO", "alignkit-plain": "PPO, plain gen.", "alignkit-before": "PPO, older code",
         "alignkit-grpo": "alignkit GRPO", "trl-grpo": "TRL 1.16 GRPO", "trl-ppo": "TRL 1.10 PPO"}
# Which side each table compares with which: (ours, peers, target ratio of completion tokens/s or None)
TABLES = [("alignkit", ["alignkit-plain", "alignkit-before", "trl-ppo", "trl-grpo"], None),
          ("alignkit-grpo", ["trl-grpo"], 2.0)]


def from_metrics(name: str, run_dir: Path, n: int) -> dict:
    """Step times, completion tokens and the mean seconds of each phase from a run's own metrics."""
    recs = [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
            if "score" in r]
    # elapsed_s is taken at the end of each step, from a clock started after setup
    step_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(recs)]
    phases = sorted({k for r in recs[1:] for k in r if k.startswith("time_")})
    phase_s = {k[5:-2]: statistics.mean(r.get(k, 0.0) for r in recs[1:]) for k in phases}
    return common.result(name, step_s, [n * r["response_length"] for r in recs[1:]], phases=phase_s)


def alignkit_config(cls, model_dir: str, steps: int, workdir: Path, name: str, **recipe) -> object:
    """The settings every alignkit side shares (model, prompts, reward, LoRA, lengths, KL, seed) plus
    the recipe's own, written as a config file and loaded as the CLI would."""
    from alignkit.config import load_config

    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps({
        "model": model_dir, "data": {"prompts": str(common.PROMPTS_FILE)}, "reward": str(common.JUDGE_FILE),
        "output_dir": str(workdir), "run_name": name, "device": "cpu", "dtype": common.DTYPE,
        "lora": common.LORA, "learning_rate": common.LEARNING_RATE, "lr_scheduler": "constant",
        "max_new_tokens": common.MAX_NEW_TOKENS, "temperature": common.TEMPERATURE, "kl_coef": common.KL_COEF,
        "max_steps": steps + 1, "save_every": 1_000_000, "keep_checkpoints": 1, "seed": common.SEED, **recipe}))
    return load_config(cls, path)


def run_alignkit_grpo(model_dir: str, steps: int, workdir: Path) -> dict:
    """The GRPO recipe on TRL GRPO's work: one prompt, 8 completions, one iteration, KL in the loss."""
    from alignkit.config import GRPOConfig
    from alignkit.recipes import grpo

    n = common.COMPLETIONS_PER_STEP
    cfg = alignkit_config(GRPOConfig, model_dir, steps, workdir, "bench-grpo", rollout_batch=1, group_size=n,
                          num_iterations=1, kl_in="loss", loss_aggregation="token")
    return from_metrics("alignkit GRPO", grpo.main(cfg, overwrite=True), n)


def run_alignkit(model_dir: str, steps: int, workdir: Path, plain: bool = False) -> dict:
    """The recipe itself, driven by its config; step times and lengths from its own metrics. `plain`
    swaps the rollout engine for transformers' model.generate on the PEFT-wrapped policy."""
    from alignkit.config import PPOConfig
    from alignkit.recipes import ppo

    if plain:
        ppo.RolloutEngine = common.PlainGenerate
    n = common.COMPLETIONS_PER_STEP
    cfg = alignkit_config(PPOConfig, model_dir, steps, workdir, "bench-ppo", rollout_batch=n, minibatch_size=n,
                          ppo_epochs=1)
    return from_metrics(SIDES["alignkit-plain" if plain else "alignkit"], ppo.main(cfg, overwrite=True), n)


def child(side: str, model_dir: str, steps: int, threads: int, out: Path) -> None:
    import torch

    torch.set_num_threads(threads)
    if side in ("alignkit", "alignkit-plain"):
        res = run_alignkit(model_dir, steps, out.parent, plain=side == "alignkit-plain")
    elif side == "alignkit-grpo":
        res = run_alignkit_grpo(model_dir, steps, out.parent)
    elif side == "trl-grpo":
        import _trl_grpo

        res = _trl_grpo.run(model_dir, steps, out.parent)
    else:
        import _trl_ppo

        res = _trl_ppo.run(model_dir, steps, out.parent)
    common.write_result(out, res)


def run_side(side: str, model_dir: str, steps: int, threads: int, workdir: Path,
             trl_ppo_path: str | None, wait_policy: str = "passive", dtype: str = "float32",
             before: str | None = None, shape: str = "bench") -> dict | str:
    """The side's result, or why it did not run. A fresh process each, so peak memory is its own."""
    out_dir = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=workdir))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "ALIGNKIT_BENCH_DTYPE": dtype, "ALIGNKIT_BENCH_SHAPE": shape}
    # OpenMP threads that spin while waiting for each other lose their time slices to every other
    # process on a busy machine: on a loaded 2-core CPU one forward pass of the embedded model took
    # 20.4 s spinning and 5.5 s passive. Passive waiting, the same for every side, keeps the
    # comparison about the trainers rather than about the neighbours.
    if wait_policy == "passive":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    else:  # OpenMP's default (spin a while, then sleep), as a user's run gets it
        env.pop("OMP_WAIT_POLICY", None)
    cmd_side, script = side, Path(__file__).resolve()
    if side == "alignkit-before":
        if not before:
            return "not run: give --before DIR (an older checkout of this repository)"
        cmd_side = "alignkit"
        env["PYTHONPATH"] = os.pathsep.join([str(Path(before).resolve() / "src"), env.get("PYTHONPATH", "")])
    if side == "trl-ppo":
        if not trl_ppo_path:
            return "not run: give --trl-ppo-path (a TRL 1.10 installed apart; 1.16 has no PPO)"
        env["PYTHONPATH"] = os.pathsep.join([trl_ppo_path, env.get("PYTHONPATH", "")])
    log = out_dir / "log.txt"
    cmd = [sys.executable, str(script), "--side", cmd_side, "--model-dir", model_dir,
           "--steps", str(steps), "--threads", str(threads), "--result", str(out_dir / "result.json")]
    with log.open("w") as f:
        proc = subprocess.run(cmd, check=False, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        lines = log.read_text().strip().splitlines() or ["(no output)"]
        why = next((line for line in reversed(lines) if "Error" in line), lines[-1])
        return f"failed (exit {proc.returncode}): {why[:300]}"
    return json.loads((out_dir / "result.json").read_text())


def median_result(rounds: list[dict | str]) -> dict | str:
    """Each figure's median over the rounds (the load on a shared machine comes and goes), and the
    range of tokens/s; a side that failed in any round reports that round's reason."""
    failed = [r for r in rounds if isinstance(r, str)]
    if failed:
        return failed[0]
    out = {key: statistics.median(r[key] for r in rounds)
           for key in ("s_per_step", "tokens_per_s", "tokens_per_step", "peak_rss_mb")}
    out["tokens_per_s_range"] = (min(r["tokens_per_s"] for r in rounds), max(r["tokens_per_s"] for r in rounds))
    out["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in rounds]
    if "phases" in rounds[0]:
        out["phases"] = {k: statistics.median(r["phases"][k] for r in rounds) for k in rounds[0]["phases"]}
    return out


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x"


def print_table(model: str, results: dict[str, dict | str], rounds: int, ours_side: str, peers: list[str],
                target: float | None) -> None:
    ours = results[ours_side]
    head = f"{'':<24} | {SIDES[ours_side]:>15}" + "".join(f" | {SIDES[s]:>15} | ratio" for s in peers)
    print(f"\n## {model}: {SIDES[ours_side]}" + (f" (median of {rounds} rounds)" if rounds > 1 else "") + f"\n{head}")
    rows = [("seconds per step", "s_per_step", "{:.2f}"), ("completion tokens / s", "tokens_per_s", "{:.1f}"),
            ("completion tokens / step", "tokens_per_step", "{:.0f}"), ("peak memory, MB", "peak_rss_mb", "{:.0f}")]
    for label, key, fmt in rows:
        line = f"{label:<24} | " + (f"{fmt.format(ours[key]):>15}" if isinstance(ours, dict) else f"{'-':>15}")
        for s in peers:
            peer = results[s]
            if isinstance(peer, dict) and isinstance(ours, dict):
                line += f" | {fmt.format(peer[key]):>15} | {ratio(ours[key], peer[key]):>5}"
            else:
                line += f" | {'-':>15} | {'-':>5}"
        print(line)
    for side in [ours_side, *peers]:
        res = results[side]
        if isinstance(res, str):
            print(f"{SIDES[side]}: {res}")
            continue
        if rounds > 1:
            low, high = res["tokens_per_s_range"]
            print(f"{SIDES[side]}: completion tokens/s ranged {low:.1f}-{high:.1f} over the rounds")
        if res.get("phases"):
            print(f"{SIDES[side]}: seconds per step by phase: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(res["phases"].items(), key=lambda kv: -kv[1])))
    if rounds > 1 and isinstance(ours, dict):
        for s in peers:
            peer = results[s]
            if isinstance(peer, dict):
                # each round runs the sides back to back, so a round's ratio shares that round's load
                paired = [a / b for a, b in zip(ours["tokens_per_s_rounds"], peer["tokens_per_s_rounds"])]
                print(f"completion tokens/s, {SIDES[ours_side]} / {SIDES[s]} round by round: median "
                      f"{statistics.median(paired):.2f}x, range {min(paired):.2f}-{max(paired):.2f}x "
                      f"({', '.join(f'{p:.2f}' for p in paired)})")
    grpo = results["trl-grpo"]
    if target and isinstance(ours, dict) and isinstance(grpo, dict):
        met = ours["tokens_per_s"] >= target * grpo["tokens_per_s"]
        print(f"target: completion tokens/s >= {target:g}x TRL GRPO's: {'met' if met else 'MISSED'} "
              f"({ratio(ours['tokens_per_s'], grpo['tokens_per_s'])})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--steps", type=int, default=4, help="measured steps per side, after one warm-up step (default 4)")
    ap.add_argument("--models", default=None,
                    help="comma-separated: 'tiny' (a 2-layer Llama built here), 'embedded' (SmolLM2-135M), "
                         "or a Hugging Face model directory (default tiny,embedded; tiny with --quick)")
    ap.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads for every side (default 2)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every side this many times, interleaved, and report medians (default 1)")
    ap.add_argument("--quick", action="store_true", help="2 measured steps, tiny model only (unless --models)")
    ap.add_argument("--trl-ppo-path", default=os.environ.get("TRL_PPO_PATH"),
                    help="directory holding TRL 1.10 (pip install --no-deps --target DIR trl==1.10.0), put first "
                         "on the TRL PPO side's PYTHONPATH; default $TRL_PPO_PATH; without it that side is skipped")
    ap.add_argument("--omp-wait-policy", choices=["passive", "default"], default="passive",
                    help="passive (default: fair on a machine shared with other jobs) or OpenMP's default "
                         "(a quiet machine, as users run)")
    ap.add_argument("--before", default=None,
                    help="an older checkout of this repository whose PPO side runs as 'alignkit-before' "
                         "(e.g. git worktree add ../alignkit-before COMMIT); without it that side is skipped")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                    help="float32 (default) for every side, or bfloat16: alignkit's dtype bfloat16 (frozen base "
                         "products in bfloat16 on the CPU) against TRL's bf16=True (autocast), or auto: each "
                         "side's default (alignkit's auto: bfloat16 on a CPU with AMX; TRL's bf16 on the same "
                         "condition; the older checkout's own auto)")
    ap.add_argument("--shape", choices=["bench", "demo"], default="bench",
                    help="bench (default): 8 x 32 tokens at T=1, LoRA r 8 on q,k,v,o, the shop prompts; demo: "
                         "the demo's PPO run (configs/demo/ppo.yaml): 8 x 48 tokens at T=0.7, LoRA r 16 on all "
                         "seven projections, its training prompts (the reward stays the judge function)")
    ap.add_argument("--sides", default=",".join(SIDES),
                    help=f"comma-separated sides to run (default all: {','.join(SIDES)})")
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # internal: one side, in a child
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be at least 1")
    if args.side:
        child(args.side, args.model_dir, args.steps, args.threads, args.result)
        return
    steps = 2 if args.quick and args.steps == 4 else args.steps
    models = (args.models or ("tiny" if args.quick else "tiny,embedded")).split(",")
    sides = args.sides.split(",")
    if not set(sides) <= set(SIDES):
        ap.error(f"--sides: unknown {sorted(set(sides) - set(SIDES))}; choose from {','.join(SIDES)}")

    os.environ["ALIGNKIT_BENCH_SHAPE"] = args.shape  # this process's settings too (the header below)
    importlib.reload(common)
    import torch

    print(f"torch {torch.__version__}, {args.threads} threads per side, CPU; sides run one after another. "
          f"{common.COMPLETIONS_PER_STEP} completions x <= {common.MAX_NEW_TOKENS} new tokens per step, "
          f"LoRA r={common.LORA['r']} on {common.LORA['target_modules']}; {steps} measured steps + 1 warm-up; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine may be shared: read ratios); "
          f"OpenMP wait policy: {args.omp_wait_policy}; dtype: {args.dtype}; shape: {args.shape}")
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            if model == "tiny":
                model_dir = str(common.build_tiny_model(Path(tmp) / "tiny-model"))
            elif model == "embedded":
                from alignkit.models.loading import resolve_base

                model_dir = str(resolve_base("embedded"))  # the converted safetensors cache
            else:
                model_dir = model
            workdir = Path(tempfile.mkdtemp(prefix="runs-", dir=tmp))
            runs = {side: ["not run (--sides)"] for side in SIDES}
            runs.update({side: [] for side in sides})
            for round_ in range(args.rounds):
                for side in sides:  # one after another, never two at once
                    name = SIDES[side]
                    print(f"{model}: {name}" + (f", round {round_ + 1}/{args.rounds}" if args.rounds > 1 else "")
                          + " ...", flush=True)
                    runs[side].append(run_side(side, model_dir, steps, args.threads, workdir, args.trl_ppo_path,
                                                   args.omp_wait_policy, args.dtype, args.before, args.shape))
            results = {side: median_result(r) for side, r in runs.items()}
            for ours, peers, target in TABLES:
                print_table(model, results, args.rounds, ours, peers, target)


if __name__ == "__main__":
    main()
