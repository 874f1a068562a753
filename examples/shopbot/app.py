"""The ShopBot application: start the real services, answer one customer request with the ReAct agent, judge the outcome.

    with ShopServices.start(workdir) as services:
        result = answer(backend, services, CustomerRequest(customer_id=7, message="..."))

`ShopServices` owns the orders database file, the shipping-label service (uvicorn on 127.0.0.1) and
the SMTP server (aiosmtpd on 127.0.0.1). `answer` signs the customer in (the customer id comes from
the request, as a session would give it, not from the model), builds the tools, and runs
`alignkit.apps.agents.react.run_agent` with the ShopBot prompt (`prompt.yaml`). `outcome` says whether
a run did the right thing: the label mailed to the customer's address, or "not found" said to a
customer who could not be found.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

import alignkit
from alignkit.apps.agents.cot import load_prompt_file
from alignkit.apps.agents.react import PROMPT_KEYS, AgentResult, run_agent
from alignkit.errors import AlignkitError

from .db import ReadOnlyDatabase, create_database, load_seed
from .label_service import BackgroundServer, create_app
from .mail import MailServer
from .tools import Shop, make_tools

PROMPT_FILE = Path(__file__).with_name("prompt.yaml")
TRAINED_ADAPTER = Path("runs/shopbot/final")
"""Where `make shopbot-train` (configs/shopbot_sft.yaml) puts a freshly trained adapter."""
SHIPPED_ADAPTER = Path(alignkit.__file__).parent / "data" / "adapters" / "shopbot"
"""The adapter that installs with the package: one `make shopbot-train`, copied by ship_adapter.py."""
MAX_STEPS = 6
MAX_TOKENS = 96  # the longest reply, a SELECT with two joins, is about 70 tokens


def load_prompt() -> dict:
    return load_prompt_file(PROMPT_FILE, PROMPT_KEYS)


def run_script(main) -> None:
    """Run a script's `main()` as the alignkit CLI runs a command: an AlignkitError is "error: ...", exit 2."""
    try:
        main()
    except AlignkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def choose_model(requested: str | None = None) -> tuple[str, str]:
    """(model spec, why it was chosen): the one asked for; else a freshly trained adapter in
    runs/shopbot/final; else the adapter shipped with the package; else the base model."""
    if requested:
        return requested, "given with --model"
    if (TRAINED_ADAPTER / "adapter_config.json").is_file():
        return str(TRAINED_ADAPTER), "the adapter trained by `make shopbot-train` (it comes before the shipped one)"
    if (SHIPPED_ADAPTER / "adapter_config.json").is_file():
        return str(SHIPPED_ADAPTER), "the adapter shipped with alignkit (retrain with `make shopbot-train`)"
    return "embedded", ("no ShopBot adapter found, so the base model, which does not follow the ReAct format: "
                        "expect failed runs; train the adapter with `make shopbot-train` (about half an hour)")


@dataclass(frozen=True)
class CustomerRequest:
    customer_id: int | None
    """The signed-in customer, or None for a visitor without a customer id."""
    message: str
    expected_order: int | None = None
    """The order the customer means, when known (generated requests); None: the customer is not found."""

    def question(self) -> str:
        """What the model is asked: the session's customer id, then the customer's words."""
        who = "none" if self.customer_id is None else str(self.customer_id)
        return f"Customer id: {who}\nMessage: {self.message}"


@dataclass
class ShopServices:
    """The real systems behind the bot; `stop()` (or leaving the `with` block) shuts them down."""

    db_path: Path
    labels: BackgroundServer
    mail: MailServer
    http: httpx.Client

    @classmethod
    def start(cls, workdir: Path, seed: dict | None = None) -> ShopServices:
        """Create the database in `workdir` from the seed data and start both servers."""
        db_path = create_database(Path(workdir) / "orders.sqlite", seed)
        labels = BackgroundServer(create_app(db_path)).start()
        try:
            mail = MailServer().start()
        except Exception:
            labels.stop()
            raise
        return cls(db_path, labels, mail, httpx.Client())

    def shop(self, customer_id: int | None, **settings) -> Shop:
        """A conversation's view of the systems, for one signed-in customer."""
        return Shop(db=ReadOnlyDatabase(self.db_path), http=self.http, label_url=self.labels.url, smtp_host=self.mail.host,
                    smtp_port=self.mail.port, customer_id=customer_id, **settings)

    def stop(self) -> None:
        self.http.close()
        self.mail.stop()
        self.labels.stop()

    def __enter__(self) -> ShopServices:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def answer(backend, services: ShopServices, request: CustomerRequest, *, prompt: dict | None = None,
           trace_path: Path | None = None, max_steps: int = MAX_STEPS, **shop_settings) -> AgentResult:
    """Run the agent on one request against the real services."""
    shop = services.shop(request.customer_id, **shop_settings)
    try:
        return run_agent(backend, make_tools(shop), request.question(), max_steps=max_steps,
                         prompt=prompt or load_prompt(), trace_path=trace_path, max_tokens=MAX_TOKENS)
    finally:
        shop.db.close()


_NOT_FOUND = re.compile(r"not (be )?found|could not find|couldn't find|cannot find|can't find|no customer",
                        re.IGNORECASE)


@dataclass
class Outcome:
    success: bool
    why: str


def outcome(request: CustomerRequest, result: AgentResult, mails: list, seed: dict | None = None) -> Outcome:
    """Did the run do the right thing? `mails` are the messages the SMTP server received during the run.

    A known customer: exactly one mail, to their address, carrying a label for the expected order,
    and a final answer. An unknown or missing customer: no mail, and a final answer saying the
    customer was not found.
    """
    seed = seed or load_seed()
    emails = {c["id"]: c["email"] for c in seed["customers"]}
    if request.expected_order is None:
        if mails:
            return Outcome(False, f"{len(mails)} mail(s) sent for a customer who does not exist")
        if result.answer is None:
            return Outcome(False, f"no final answer ({result.message})")
        if not _NOT_FOUND.search(result.answer):
            return Outcome(False, f"the answer does not say the customer was not found: {result.answer!r}")
        return Outcome(True, "said the customer was not found")
    if len(mails) != 1:
        return Outcome(False, f"{len(mails)} mails sent, expected 1")
    mail = mails[0]
    expected_to = emails[request.customer_id]
    if mail["To"] != expected_to:
        return Outcome(False, f"mailed to {mail['To']}, expected {expected_to}")
    if f"order {request.expected_order}" not in mail["Subject"]:
        return Outcome(False, f"label for the wrong order: {mail['Subject']!r}")
    if result.answer is None:
        return Outcome(False, f"label mailed but no final answer ({result.message})")
    return Outcome(True, f"label for order {request.expected_order} mailed to {expected_to}")
