"""Synthetic ReAct traces for teaching a small model the ShopBot's format, made by running the real tools.

    python -m examples.shopbot.make_traces --out runs/shopbot-data

Customer requests are generated from the seed data with varied phrasings, in two disjoint splits:
train (customers 1-30, unknown ids 41-99, the train phrasings) and held-out (customers 31-40,
unknown ids 100-199, phrasings never seen in training). A `Demonstrator` plays the model: a
rule-based policy that knows each request's answer and writes the reply a good agent would. It is
driven by `run_agent` itself against the real database, label service and SMTP server, so the
observations are real and the chat is exactly what inference builds (`react_messages` +
`scratchpad_messages`). Each run becomes one SFT record in the messages format; the loss counts
every assistant turn.

Writes train.jsonl (SFT), heldout.jsonl (SFT, for eval loss) and heldout_requests.jsonl (the
requests with their expected outcome, for evaluate.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from alignkit.apps.agents.react import react_messages, scratchpad_messages
from alignkit.errors import AlignkitError
from alignkit.io import read_jsonl, write_jsonl

from .app import CustomerRequest, ShopServices, answer, load_prompt, outcome
from .db import load_seed
from .tools import make_tools

TRAIN_PHRASINGS = [
    "Hi, I want to return the {item} I ordered.",
    "The {item} arrived broken. How do I send it back?",
    "Can I get a return label for my {item}?",
    "I'd like to return my {item}, please.",
    "My {item} doesn't work. I want to send it back.",
    "Please send me a return label for the {item}.",
    "hello, how can i return the {item}?",
    "I changed my mind about the {item}. Can I return it?",
]
HELDOUT_PHRASINGS = [
    "Good morning! I need to return the {item} from my order.",
    "The {item} is the wrong size, I want to return it.",
    "Could you help me send the {item} back?",
]
TRAIN_CUSTOMERS = range(1, 31)
HELDOUT_CUSTOMERS = range(31, 41)
TRAIN_UNKNOWN_IDS = range(41, 100)
HELDOUT_UNKNOWN_IDS = range(100, 200)
HOSTILE_MARKER = "IGNORE PREVIOUS"  # the seed's item whose name carries instructions is never a request


def keyword(product: str) -> str:
    """The word a query searches for: the product's last word ("Electric kettle" -> "kettle")."""
    return product.split()[-1].lower()


def mention(product: str, rng: random.Random) -> str:
    """How a customer names a product: in full or by its last word."""
    return product.lower() if rng.random() < 0.5 else keyword(product)


def make_requests(seed: dict, customers, unknown_ids, phrasings: list[str], *, per_item: int,
                  n_unknown: int, n_no_id: int, rng: random.Random) -> list[CustomerRequest]:
    """Requests of known customers for each of their items, of unknown ids, and of visitors without an id."""
    orders = {o["id"]: o for o in seed["orders"]}
    requests = []
    for item in seed["items"]:
        owner = orders[item["order_id"]]["customer_id"]
        if owner not in customers or HOSTILE_MARKER in item["name"]:
            continue
        for template in rng.sample(phrasings, per_item):
            requests.append(CustomerRequest(owner, template.format(item=mention(item["name"], rng)),
                                            expected_order=item["order_id"]))
    products = sorted({i["name"] for i in seed["items"] if HOSTILE_MARKER not in i["name"]})
    for customer_id in rng.sample(list(unknown_ids), n_unknown):
        text = rng.choice(phrasings).format(item=mention(rng.choice(products), rng))
        requests.append(CustomerRequest(customer_id, text))
    for _ in range(n_no_id):
        requests.append(CustomerRequest(None, rng.choice(phrasings).format(item=mention(rng.choice(products), rng))))
    rng.shuffle(requests)
    return requests


def split_requests(seed: dict, rng_seed: int = 0) -> tuple[list[CustomerRequest], list[CustomerRequest]]:
    """(train, held-out) requests: disjoint customers, unknown ids and phrasings."""
    rng = random.Random(rng_seed)
    train = make_requests(seed, TRAIN_CUSTOMERS, TRAIN_UNKNOWN_IDS, TRAIN_PHRASINGS, per_item=2,
                          n_unknown=30, n_no_id=20, rng=rng)
    heldout = make_requests(seed, HELDOUT_CUSTOMERS, HELDOUT_UNKNOWN_IDS, HELDOUT_PHRASINGS, per_item=1,
                            n_unknown=6, n_no_id=4, rng=rng)
    return train, heldout


def order_query(customer_id: int, item: str) -> str:
    return ("SELECT o.id, c.email FROM customers c JOIN orders o ON o.customer_id = c.id "
            f"JOIN items i ON i.order_id = o.id WHERE c.id = {customer_id} AND i.name LIKE '%{item}%'")


@functools.cache
def product_words() -> tuple[str, ...]:
    """The search word of every product in the seed data, longest first."""
    return tuple(sorted({keyword(i["name"]) for i in load_seed()["items"]}, key=len, reverse=True))


def item_word(message: str) -> str:
    """The product word a generated message names (it is followed by a space or punctuation)."""
    words = re.findall(r"[a-z]+", message.lower())
    for word in product_words():
        if word in words:
            return word
    raise AlignkitError(f"no product named in {message!r}")


class Demonstrator:
    """The reply a good ShopBot writes at each step of one request; a ChatBackend for `run_agent`.

    It reads only what the model would see (the request and the observations) plus the product word
    of the request, and it is deterministic: traces differ through the requests and the real
    observations (order ids, e-mail addresses, label ids).
    """

    def __init__(self, request: CustomerRequest):
        self.request = request
        self.found: dict | None = None
        self.label_id: str | None = None

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float, stop=None) -> str:
        request, last = self.request, messages[-1]["content"]
        if request.customer_id is None:
            return ("Thought: The customer has no customer id.\n"
                    "Final Answer: Sorry, your customer account was not found. Please sign in first.")
        if last.startswith("Question:"):
            word = item_word(request.message)
            return (f"Thought: I look up the order with the {word}.\n"
                    f"Action: sql_query\nAction Input: {json.dumps({'sql': order_query(request.customer_id, word)})}")
        observation = last.removeprefix("Observation:").strip()
        if self.found is None:
            rows = json.loads(observation)
            if not rows:
                return ("Thought: The query found nothing.\n"
                        f"Final Answer: Sorry, customer {request.customer_id} was not found. Please check "
                        "your customer id.")
            self.found = rows[0]
            return ("Thought: I create a return label.\n"
                    f"Action: create_return_label\nAction Input: {json.dumps({'order_id': self.found['id']})}")
        if self.label_id is None:
            self.label_id = json.loads(observation)["label_id"]
            return ("Thought: I e-mail the label.\n"
                    "Action: email_label\nAction Input: "
                    + json.dumps({"label_id": self.label_id, "email": self.found["email"]}))
        return ("Thought: I know the final answer\n"
                f"Final Answer: I have e-mailed return label {self.label_id} for order {self.found['id']} "
                f"to {self.found['email']}.")


def demonstrate(services: ShopServices, request: CustomerRequest, prompt: dict, seed: dict) -> dict:
    """Run the demonstrator on the real services; the SFT record of its chat. AlignkitError if it went wrong."""
    before = len(services.mail.messages)
    result = answer(Demonstrator(request), services, request, prompt=prompt)
    judged = outcome(request, result, services.mail.messages[before:], seed)
    if not judged.success:  # a bad demonstration would teach the model a mistake
        raise AlignkitError(f"the demonstration of {request} failed: {judged.why}")
    shop = services.shop(request.customer_id)
    head = react_messages(prompt, make_tools(shop), request.question())
    shop.db.close()
    steps = result.steps
    messages = head + scratchpad_messages(prompt, steps[:-1]) + [{"role": "assistant", "content": steps[-1].output}]
    return {"messages": messages}


def request_record(request: CustomerRequest) -> dict:
    return {"customer_id": request.customer_id, "message": request.message, "expected_order": request.expected_order}


def read_requests(path: Path) -> list[CustomerRequest]:
    """Requests written by `main` (heldout_requests.jsonl)."""
    return [CustomerRequest(r["customer_id"], r["message"], r.get("expected_order")) for _, r in read_jsonl(path)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/shopbot-data"),
                        help="Directory for train.jsonl, heldout.jsonl and heldout_requests.jsonl.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed of the request generator.")
    args = parser.parse_args(argv)

    seed, prompt = load_seed(), load_prompt()
    train, heldout = split_requests(seed, args.seed)
    with tempfile.TemporaryDirectory() as workdir, ShopServices.start(Path(workdir), seed) as services:
        records = {name: [demonstrate(services, r, prompt, seed) for r in tqdm(requests, desc=name)]
                   for name, requests in (("train", train), ("heldout", heldout))}
    write_jsonl(args.out / "train.jsonl", records["train"])
    write_jsonl(args.out / "heldout.jsonl", records["heldout"])
    write_jsonl(args.out / "heldout_requests.jsonl", [request_record(r) for r in heldout])
    print(f"{len(train)} train and {len(heldout)} held-out traces written to {args.out}")


if __name__ == "__main__":
    main()
