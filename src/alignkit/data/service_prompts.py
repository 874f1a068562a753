"""The demo's customer-service prompt sets, generated deterministically from templates x slots.

    python -m alignkit.data.service_prompts            # rewrites the shipped sets in data/examples/
    python -m alignkit.data.service_prompts --check    # exit 1 if the shipped sets differ from a regeneration

Templates and slot values (customer name, product, problem, order number, tone from polite to
hostile) are data, in prompts/service_prompts.yaml. The training prompts and their validation
slice come from its `train` section; the held-out prompts from its `heldout` section, whose
templates, products, problems, names and order-number prefix the training prompts never use, so a
gain on them is a skill and not memory of the training prompts.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

SLOTS_FILE = Path(__file__).resolve().parents[1] / "prompts" / "service_prompts.yaml"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
SIZES = {"train": 400, "val": 48, "heldout": 120}
FILES = {name: f"service_{name}.txt" for name in SIZES}
SEED = 15


@dataclass(frozen=True)
class ServicePrompt:
    text: str
    template: str
    tone: int
    name: str
    product: str
    problem: str
    order: str


def read_slots(path: Path = SLOTS_FILE) -> dict:
    return yaml.safe_load(Path(path).read_text())


def sample(section: dict, n: int, rng: random.Random, taken: set[str]) -> list[ServicePrompt]:
    """`n` distinct prompts of one section; templates take turns so every tone is equally present.

    Texts already in `taken` are skipped and the new ones added, so two calls never overlap.
    """
    out: list[ServicePrompt] = []
    templates = section["templates"]
    while len(out) < n:
        tpl = templates[len(out) % len(templates)]
        slots = {"name": rng.choice(section["names"]), "product": rng.choice(section["products"]),
                 "problem": rng.choice(section["problems"]),
                 "order": f"{section['order_prefix']}{rng.randrange(10_000):04d}"}
        text = tpl["text"].format(**slots)
        if text in taken:
            continue
        taken.add(text)
        out.append(ServicePrompt(text, tpl["text"], int(tpl["tone"]), **slots))
    return out


def generate_sets(slots: dict | None = None, seed: int = SEED) -> dict[str, list[ServicePrompt]]:
    """{'train': 400, 'val': 48, 'heldout': 120} prompts; the same every time for the same seed."""
    slots = slots or read_slots()
    rng, taken = random.Random(seed), set()
    return {"train": sample(slots["train"], SIZES["train"], rng, taken),
            "val": sample(slots["train"], SIZES["val"], rng, taken),
            "heldout": sample(slots["heldout"], SIZES["heldout"], rng, taken)}


def render(prompts: list[ServicePrompt]) -> str:
    return "".join(p.text + "\n" for p in prompts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignkit.data.service_prompts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=EXAMPLES_DIR, help="folder for the three files (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args(argv)
    sets = generate_sets()
    stale = []
    for name, prompts in sets.items():
        path = args.out / FILES[name]
        if args.check:
            if not path.is_file() or path.read_text() != render(prompts):
                stale.append(str(path))
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(render(prompts))
            print(f"{path}: {len(prompts)} prompts")
    if stale:
        print("differs from a regeneration: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
