"""The shipping-label service: an HTTP API (FastAPI) that issues return labels for delivered orders.

    POST /labels {"order_id": 1042, "customer_id": 7} -> 201 {"label_id": "RL-1042-3f9a0c", "url": ...}
    GET  /labels/{label_id}                             -> the label
    GET  /health                                        -> {"ok": true}

The service checks the order itself (it exists, belongs to the customer, was delivered) rather than
trusting its caller: 404, 403 and 409 say which check failed. `BackgroundServer` runs any ASGI app
with uvicorn on 127.0.0.1 in a thread, for the demo and the tests.
"""

from __future__ import annotations

import secrets
import socket
import sqlite3
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

from alignkit.errors import AlignkitError


class LabelRequest(BaseModel):
    order_id: int
    customer_id: int


def create_app(db_path: Path) -> FastAPI:
    """The label service over the orders database at `db_path` (opened read-only)."""
    app = FastAPI(title="Shipping labels")
    labels: dict[str, dict] = {}
    uri = f"{Path(db_path).resolve().as_uri()}?mode=ro"

    def order_row(order_id: int) -> tuple[int, str] | None:
        with sqlite3.connect(uri, uri=True) as con:
            return con.execute("SELECT customer_id, status FROM orders WHERE id = ?", (order_id,)).fetchone()

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/labels", status_code=201)
    def create_label(body: LabelRequest, request: Request) -> dict:
        row = order_row(body.order_id)
        if row is None:
            raise HTTPException(404, f"order {body.order_id} does not exist")
        owner, status = row
        if owner != body.customer_id:
            raise HTTPException(403, f"order {body.order_id} does not belong to customer {body.customer_id}")
        if status != "delivered":
            raise HTTPException(409, f"order {body.order_id} is {status}; only delivered orders can be returned")
        label_id = f"RL-{body.order_id}-{secrets.token_hex(3)}"
        label = {"label_id": label_id, "order_id": body.order_id, "customer_id": body.customer_id,
                 "url": str(request.url_for("get_label", label_id=label_id))}
        labels[label_id] = label
        return label

    @app.get("/labels/{label_id}")
    def get_label(label_id: str) -> dict:
        if label_id not in labels:
            raise HTTPException(404, f"no label {label_id}")
        return labels[label_id]

    return app


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """An ASGI app served by uvicorn on 127.0.0.1:`port` in a daemon thread; use as a context manager."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, timeout_s: float = 10.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AlignkitError(f"the HTTP server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
