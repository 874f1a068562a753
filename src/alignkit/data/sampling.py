"""Candidate sampling for preference labeling (`alignkit prefs sample`), written batch by batch so a
killed run continues where it stopped.

    alignkit prefs sample --prompts prompts.txt --n 4 --out candidates.jsonl

Every batch holds whole prompts (all n completions of a prompt sit in one batch), and every
completion samples with its own seed, derived from the base seed and its position in the file (the
rollout engine draws a row's tokens from its seed alone), so the file a resumed run finishes is byte
for byte the file an uninterrupted run writes.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from alignkit.io import ResumableJsonl, batch_seed, file_digest


def sample_candidates(prompts_path: Path, out: Path, *, model: str = "embedded", n: int = 4,
                      max_new_tokens: int = 96, temperature: float = 0.8, top_p: float = 0.95, seed: int = 0,
                      batch_size: int = 8, device: str = "auto", restart: bool = False) -> dict:
    """Sample `n` completions per prompt into a rankings file with empty ranks.

    A prompt with fewer than two non-empty completions is left out (and listed in "skipped").
    Returns {"written", "skipped", "resumed_at", "prompts"}.
    """
    from alignkit.data.prompts import load_prompts
    from alignkit.models import generate, load_model

    items = load_prompts(prompts_path)
    per_batch = max(1, batch_size // n)
    fingerprint = {"command": "prefs sample", "prompts": file_digest(prompts_path), "model": model, "n": n,
                   "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                   "prompts_per_batch": per_batch}
    writer = ResumableJsonl(out, fingerprint, restart=restart)
    resumed_at = writer.done
    skipped = writer.state.get("skipped", [])
    if writer.done < len(items):
        m, tok = load_model(model, device=device)
        starts = range(writer.done, len(items), per_batch)
        for start in tqdm(starts, desc="sampling", unit="batch", initial=writer.done // per_batch,
                          total=-(-len(items) // per_batch)):
            batch = items[start:start + per_batch]
            # Rows are prompt-major (prompt i's completions are rows i*n .. i*n+n-1) and share its prefill.
            texts = generate(m, tok, batch, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=[batch_seed(seed, row) for row in range(start * n, (start + len(batch)) * n)]).texts
            records = []
            for i, p in enumerate(batch):
                comps = [c for c in texts[i * n:(i + 1) * n] if c.strip()]
                if len(comps) < 2:
                    skipped.append(f"prompt {start + i + 1}: fewer than 2 non-empty completions")
                    continue
                records.append({"prompt": p, "completions": comps, "ranks": [], "labeler": None, "model": model})
            writer.state["skipped"] = skipped
            writer.append(records, done=start + len(batch))
    writer.finish()
    return {"written": len(writer.records()), "skipped": skipped, "resumed_at": resumed_at, "prompts": len(items)}
