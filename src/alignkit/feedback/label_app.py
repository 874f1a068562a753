"""The human labeling web app: labelers log in with a token and rank sampled completions, task by task.

`create_app` builds the FastAPI app: a static front end (no build step, nothing fetched from other
hosts) and a JSON API behind bearer tokens. Every request opens its own SQLite connection, so
uvicorn's worker threads never share one. Tokens travel in clear text over plain HTTP: the server
listens on 127.0.0.1 by default; put it behind a TLS proxy to serve other machines.

API (all under /api, all need `Authorization: Bearer <token>`):
  GET  /api/me            -> {"labeler"}
  GET  /api/instructions  -> {"markdown"}
  GET  /api/next?skip=ID  -> {"task": {"id", "prompt", "completions"} or null, "done", "total"}; the
                             first task not yet labeled, passing over skipped ids while others are left
  GET  /api/task/ID       -> {"task", "ranks"}: a task and this labeler's ranks of it (null if none), for "back"
  POST /api/labels        {"task_id", "ranks"} -> {"done", "total"}; 422 with a message if invalid
  GET  /api/progress      -> {"total", "labelers": [{"name", "done"}]}
"""

# No `from __future__ import annotations` here: FastAPI must evaluate the route annotations, and
# `Labeler` is an alias local to create_app that a string annotation could not be resolved against.
import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from alignkit.feedback import label_store as store
from alignkit.feedback.label_store import add_labeler, export, load_tasks

__all__ = ["add_labeler", "create_app", "export", "load_tasks", "serve"]

DEFAULT_INSTRUCTIONS = Path(__file__).with_name("instructions.md")
STATIC = Path(__file__).with_name("static")

# Completions are model output shown to people: the page places them as text only, and this policy
# stops any script or resource that is not ours from running or loading even if that ever slipped.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every HTTP response (plain ASGI: no extra task per request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


class LabelIn(BaseModel):
    task_id: str
    ranks: list[Any]
    """Checked by label_store.rank_problems rather than by type, so every bad rank gets one clear message."""


def create_app(db_path: Path, instructions_path: Path | None = None) -> FastAPI:
    """The labeling app over the database at `db_path` (created if missing).

    The instructions (Markdown) are read once, here, so a missing file fails at start-up rather
    than on a labeler's first page.
    """
    db_path = Path(db_path)
    instructions = Path(instructions_path or DEFAULT_INSTRUCTIONS).read_text(encoding="utf-8")
    store.init_db(db_path)
    app = FastAPI(title="alignkit labeling", docs_url=None, redoc_url=None, openapi_url=None)
    bearer = HTTPBearer(auto_error=False)

    app.add_middleware(SecurityHeaders)

    def authenticate(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        if credentials is None:
            raise HTTPException(401, "no token: send the header 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        with store.connect(db_path) as conn:
            name = store.labeler_for_token(conn, credentials.credentials)
        if name is None:
            raise HTTPException(401, "token not recognised; ask for a new one if yours was replaced",
                                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return name

    Labeler = Annotated[str, Depends(authenticate)]  # the name of the labeler whose token came with the request

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        # The page itself holds no data; everything it shows comes from the API after login.
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/me")
    def me(name: Labeler) -> dict:
        return {"labeler": name}

    @app.get("/api/instructions")
    def get_instructions(name: Labeler) -> dict:
        return {"markdown": instructions}

    @app.get("/api/next")
    def next_task(name: Labeler, skip: Annotated[list[str], Query()] = []) -> dict:
        with store.connect(db_path) as conn:
            task = store.next_task(conn, name, skip)
            return {"task": None if task is None else dataclasses.asdict(task), **store.done_and_total(conn, name)}

    @app.get("/api/task/{task_id}")
    def get_task(task_id: str, name: Labeler) -> dict:
        with store.connect(db_path) as conn:
            found = store.task_for(conn, name, task_id)
        if found is None:
            raise HTTPException(404, f"no task with id {task_id!r}")
        return {"task": dataclasses.asdict(found[0]), "ranks": found[1]}

    @app.post("/api/labels")
    def post_label(label: LabelIn, name: Labeler) -> dict:
        with store.connect(db_path) as conn:
            try:
                store.save_label(conn, name, label.task_id, label.ranks)
            except store.InvalidLabel as e:
                raise HTTPException(422, str(e)) from None
            return store.done_and_total(conn, name)

    @app.get("/api/progress")
    def get_progress(name: Labeler) -> dict:
        with store.connect(db_path) as conn:
            return store.progress(conn)

    return app


def serve(db_path: Path, tasks_path: Path | None, port: int = 8000, host: str = "127.0.0.1",
          instructions_path: Path | None = None) -> None:
    """Load `tasks_path` (when given) into the database, then serve the app until interrupted."""
    import uvicorn

    added, labels = store.load_rankings(db_path, tasks_path) if tasks_path is not None else (0, 0)
    app = create_app(db_path, instructions_path)
    with store.connect(db_path) as conn:
        overview = store.progress(conn)
    if tasks_path is not None:
        print(f"{tasks_path}: {added} new task(s), {labels} new label(s) kept from the file", file=sys.stderr)
    print(f"{db_path}: {overview['total']} task(s), {len(overview['labelers'])} labeler(s)", file=sys.stderr)
    if not overview["labelers"]:
        print(f"no labelers yet: add one with `alignkit label add-labeler NAME --db {db_path}`", file=sys.stderr)
    print(f"labeling at http://{host}:{port}/  (Ctrl+C stops)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info")
