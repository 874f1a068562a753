"""A reward model with a frozen backbone: `alignkit train reward` with `frozen:` set.

    alignkit train reward --config configs/demo/reward.yaml   # frozen: {layer: 22}, lora: {enabled: false}

Top to bottom:
  1. the pairs, with the same prompt-wise held-out split as the LoRA recipe (data.eval or eval_fraction);
  2. features: one forward pass of the frozen model (cut at `frozen.layer`) over every distinct
     (prompt, reply) of the pairs, the hidden states averaged over the reply's tokens
     (models/pooled_head.py); replies to one prompt read it once;
  3. fit: a linear head on the standardised features by L-BFGS, minimising the pairs' loss (the
     Bradley-Terry loss with the pairs' margins when use_margin, or the soft-label loss when
     soft_labels) plus weight_decay * |w|^2; the bias centres the training replies' rewards at 0;
  4. held-out pair accuracy, loss and margin, in metrics.jsonl as the LoRA recipe writes them, and
     the head saved to final/.
Where a LoRA reward model reads every pair forward and backward at every step, this reads each reply
once, forward only; on the demo's pairs its prompt-wise 5-fold accuracy was 0.80 (layer 22, weight
decay 0.1) against 0.70 held out for the LoRA reward model trained on them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from alignkit.config import RewardConfig
from alignkit.data.prefs import load_pairs
from alignkit.errors import AlignkitError
from alignkit.io import JsonlLog
from alignkit.losses.reward import bradley_terry_loss, soft_bradley_terry_loss
from alignkit.models.pooled_head import PooledHeadModel
from alignkit.runs import METRICS_FILE
from alignkit.training import make_accelerator, open_run_dir


def pair_loss(rc: torch.Tensor, rr: torch.Tensor, pairs: list[dict], cfg: RewardConfig) -> torch.Tensor:
    """Per-pair loss of rewards rc, rr (each (P,)) under the recipe's settings."""
    if cfg.soft_labels:
        return soft_bradley_terry_loss(rc, rr, torch.tensor([float(p.get("p_chosen", 1.0)) for p in pairs]))
    margins = [float(p.get("margin") or 0.0) if cfg.use_margin else 0.0 for p in pairs]
    return bradley_terry_loss(rc, rr, torch.tensor(margins))


def fit_head(fc: torch.Tensor, fr: torch.Tensor, pairs: list[dict], cfg: RewardConfig,
             texts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(w, b) of reward(f) = w . f + b on raw features: the weights fitted on standardised features
    (mean and spread of the training replies `texts`), folded back so the training replies' mean
    reward is 0."""
    mu, sd = texts.mean(dim=0), texts.std(dim=0) + 1e-6
    dc, dr = (fc - mu) / sd, (fr - mu) / sd
    w = torch.zeros(fc.shape[1], dtype=torch.float64, requires_grad=True)
    dc, dr = dc.double(), dr.double()
    optimizer = torch.optim.LBFGS([w], max_iter=cfg.frozen.max_iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = pair_loss(dc @ w, dr @ w, pairs, cfg).mean() + cfg.frozen.weight_decay * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w = (w.detach() / sd.double()).float()
    return w, float(-(mu @ w))


def pair_metrics(score_c: torch.Tensor, score_r: torch.Tensor, pairs: list[dict], cfg: RewardConfig,
                 prefix: str = "") -> dict:
    margin = score_c - score_r
    return {f"{prefix}loss": round(pair_loss(score_c, score_r, pairs, cfg).mean().item(), 6),
            f"{prefix}accuracy": round((margin > 0).float().mean().item(), 6),
            f"{prefix}margin": round(margin.mean().item(), 6)}


def main(cfg: RewardConfig, *, resume: Path | None = None, overwrite: bool = False) -> Path:
    """Fit the head; returns the run directory (final/ loads with PooledHeadModel.from_pretrained)."""
    from alignkit.recipes.reward import split_by_prompt

    # ---- setup ---------------------------------------------------------------------------------
    if cfg.lora.enabled:
        raise AlignkitError("reward: frozen is set, so no backbone weight is trained; set lora.enabled: false")
    accelerator = make_accelerator(cfg)
    if accelerator.num_processes > 1:
        raise AlignkitError("reward: a frozen-backbone head is fitted in one process (it takes seconds after "
                            "one forward pass); run it without accelerate launch")
    train, evals = load_pairs(cfg.data.train), load_pairs(cfg.data.eval) if cfg.data.eval else []
    if not cfg.data.eval and cfg.data.eval_fraction > 0:
        train, evals = split_by_prompt(train, cfg.data.eval_fraction, cfg.seed)
    if not train:
        raise AlignkitError(f"{cfg.data.train}: no training pairs left")
    run_dir = open_run_dir(cfg, "reward", resume, overwrite, accelerator)
    model, tokenizer = PooledHeadModel.from_base(cfg.model, layer=cfg.frozen.layer, device=accelerator.device)
    distinct = list(dict.fromkeys((p["prompt"], p[k]) for p in train + evals for k in ("chosen", "rejected")))
    print(f"reward: model {cfg.model} (frozen, layer {model.layer} mean-pooled + linear head: "
          f"{model.head.weight.numel() + 1} trainable) | {len(train)} train / {len(evals)} eval pairs | "
          f"{len(distinct)} distinct replies | run dir {run_dir}", flush=True)

    # ---- features, once per distinct reply ---------------------------------------------------------
    t0 = time.time()
    feats = model.features(tokenizer, [p for p, _ in distinct], [c for _, c in distinct],
                           max_length=cfg.data.max_length, progress="reward features")
    index = {key: i for i, key in enumerate(distinct)}

    def side(pairs: list[dict], key: str) -> torch.Tensor:
        return feats[[index[(p["prompt"], p[key])] for p in pairs]]

    features_s = time.time() - t0

    # ---- fit the head ------------------------------------------------------------------------------
    t1 = time.time()
    fc, fr = side(train, "chosen"), side(train, "rejected")
    train_texts = feats[sorted({index[(p["prompt"], p[k])] for p in train for k in ("chosen", "rejected")})]
    torch.manual_seed(cfg.seed)
    w, b = fit_head(fc, fr, train, cfg, train_texts)
    with torch.no_grad():
        model.head.weight.copy_(w[None, :])
        model.head.bias.fill_(b)
    record = {"step": 1, **pair_metrics(fc @ w, fr @ w, train, cfg)}
    if evals:
        record.update(pair_metrics(side(evals, "chosen") @ w, side(evals, "rejected") @ w, evals, cfg, "eval_"))
    record.update(features_s=round(features_s, 3), fit_s=round(time.time() - t1, 3),
                  elapsed_s=round(time.time() - t0, 3))
    metrics = JsonlLog(run_dir / METRICS_FILE)
    metrics.write(record)
    metrics.close()

    # ---- save ------------------------------------------------------------------------------------
    model.save_pretrained(run_dir / "final", tokenizer)
    if evals:
        print(f"reward: held-out pair accuracy {record['eval_accuracy']:.3f} on {len(evals)} pairs "
              f"(the share of held-out pairs where the chosen reply scores higher)", flush=True)
    print(f"reward: done in {record['elapsed_s']:.1f}s (features {features_s:.1f}s, fit {record['fit_s']:.1f}s) | "
          f"train accuracy {record['accuracy']:.3f}" + (f" | eval_accuracy {record['eval_accuracy']:.4f}" if evals else "")
          + f" | model saved to {run_dir / 'final'}", flush=True)
    return run_dir
