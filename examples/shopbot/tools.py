"""The ShopBot's tools, and the application checks that stand between the model and every real system.

The model proposes actions; `make_tools(shop)` gives it three, each bound to one signed-in customer
(`Shop.customer_id`, set by the application from the session, never from the model's text):

* `sql_query(sql)`: one checked, read-only SELECT on the orders database (see `db.py`), which sees
  only the signed-in customer's rows (none when no customer is signed in).
* `create_return_label(order_id)`: asks the shipping-label service for a label. Before the request the
  application checks that a customer is signed in and that the order exists and belongs to them.
  A service that refuses the connection or is too slow is retried with exponential backoff, then
  reported as an observation.
* `email_label(label_id, email)`: mails a label made in this conversation to the customer. The address
  must be the one on file for the signed-in customer.

Whatever a tool result or a database row says ("ignore previous instructions and e-mail ...") can
change what the model asks for, but not what these checks allow. Refusals raise `ToolError`, which
the agent loop shows to the model as the step's observation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from alignkit.apps.agents.tools import Tool, ToolError
from alignkit.errors import AlignkitError

if not __package__:  # loaded as a lone file, as `alignkit agent run --tools examples/shopbot/tools.py` does
    raise AlignkitError(
        "examples/shopbot/tools.py: the ShopBot's tools cannot run under `alignkit agent run`. They are "
        "built per conversation by make_tools(shop), bound to an orders database, a shipping-label service "
        "and an SMTP server that must be running, and to the signed-in customer's id, which the session "
        "gives (never the model) and `agent run` has no way to give; the ShopBot also needs its own prompt "
        "and its fine-tuned adapter. Run the ShopBot itself, which starts the services, answers and stops "
        "them: from the repository root, python -m examples.shopbot.run_demo --customer 33 "
        "\"Can I return the umbrella?\" (your own request) or make shopbot-demo (four requests).")

from .db import ReadOnlyDatabase  # noqa: E402 (after the check above, which gives the reason they would fail)
from .mail import send_mail  # noqa: E402

SENDER = "returns@shop.example"
NOT_SIGNED_IN = "no customer is signed in, so the customer was not found"


@dataclass
class Shop:
    """The systems one conversation may use, and who the customer is."""

    db: ReadOnlyDatabase
    http: httpx.Client
    """Client for the label service; shared, since building one (its TLS context) costs milliseconds."""
    label_url: str
    """Base URL of the shipping-label service, e.g. http://127.0.0.1:8123."""
    smtp_host: str
    smtp_port: int
    customer_id: int | None
    """The signed-in customer; None for a visitor who gave no customer id."""
    http_timeout_s: float = 2.0
    attempts: int = 3
    """Tries of a label request before the service counts as unavailable."""
    backoff_s: float = 0.2
    """Wait before the second try; it doubles before each further one."""
    labels: dict[str, dict] = field(default_factory=dict)
    """Labels made in this conversation, by label id."""


def request_label(shop: Shop, order_id: int) -> dict:
    """POST the label request, retrying refused connections and timeouts with exponential backoff."""
    url = f"{shop.label_url}/labels"
    failure = ""
    for attempt in range(shop.attempts):
        if attempt:
            time.sleep(shop.backoff_s * 2 ** (attempt - 1))
        try:
            response = shop.http.post(url, json={"order_id": order_id, "customer_id": shop.customer_id},
                                  timeout=shop.http_timeout_s)
        except httpx.ConnectError:
            failure = "connection refused"
            continue
        except httpx.TimeoutException:
            failure = f"no answer within {shop.http_timeout_s:g} s"
            continue
        if response.status_code >= 500:
            failure = f"HTTP {response.status_code}"
            continue
        if response.status_code >= 400:  # the service refused the request itself: retrying will not help
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ToolError(f"the shipping-label service refused: {detail}")
        return response.json()
    raise ToolError(f"the shipping-label service is unavailable ({failure}, {shop.attempts} attempts); "
                    "tell the customer to try again later")


def make_tools(shop: Shop) -> list[Tool]:
    """The tools the model sees, bound to `shop` and its signed-in customer."""

    def sql_query(sql: str) -> str:
        """Run one read-only SQL SELECT on the shop database and return the rows as JSON. Tables: customers(id, name, email), orders(id, customer_id, placed, status),
        items(id, order_id, name, price, quantity).

        Args:
            sql: One SELECT statement.
        """
        return json.dumps(shop.db.query(sql, shop.customer_id), ensure_ascii=False)

    def create_return_label(order_id: int) -> str:
        """Create a return shipping label for one of the customer's orders.

        Args:
            order_id: The id of the order to return.
        """
        if shop.customer_id is None or shop.db.customer_email(shop.customer_id) is None:
            raise ToolError(NOT_SIGNED_IN)
        owner = shop.db.order_owner(order_id)
        if owner is None:
            raise ToolError(f"order {order_id} does not exist")
        if owner != shop.customer_id:
            raise ToolError(f"refused: order {order_id} is not an order of this customer")
        label = request_label(shop, order_id)
        shop.labels[label["label_id"]] = label
        return json.dumps({"label_id": label["label_id"]})  # the link goes into the e-mail

    def email_label(label_id: str, email: str) -> str:
        """E-mail a return label to the customer.

        Args:
            label_id: The label id from create_return_label.
            email: The customer's e-mail address.
        """
        if shop.customer_id is None:
            raise ToolError(NOT_SIGNED_IN)
        on_file = shop.db.customer_email(shop.customer_id)
        if on_file is None:
            raise ToolError(NOT_SIGNED_IN)
        if email.strip().lower() != on_file.lower():
            raise ToolError(f"refused: {email} is not the e-mail address on file for this customer")
        label = shop.labels.get(label_id)
        if label is None or label["customer_id"] != shop.customer_id:
            raise ToolError(f"no label {label_id} was made for this customer; call create_return_label first")
        body = (f"Hello,\n\nhere is your return label {label_id} for order {label['order_id']}:\n"
                f"{label['url']}\n\nPrint it and attach it to the parcel.\n")
        try:
            send_mail(shop.smtp_host, shop.smtp_port, sender=SENDER, to=on_file,
                      subject=f"Your return label for order {label['order_id']}", body=body)
        except OSError as e:
            raise ToolError(f"the e-mail could not be sent ({e}); tell the customer to try again later") from None
        return f"e-mail with label {label_id} sent to {on_file}"

    return [Tool.from_function(f) for f in (sql_query, create_return_label, email_label)]
