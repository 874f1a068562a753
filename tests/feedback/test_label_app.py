"""Tests of the labeling app against a live uvicorn server: the page in headless Chromium, 20 labelers
at once over HTTP, tokens, validation of submissions and task files, and export."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

import alignkit

from alignkit.errors import AlignkitError, DataError
from alignkit.feedback.label_app import DEFAULT_INSTRUCTIONS, add_labeler, create_app, export, load_tasks
from alignkit.feedback.label_store import hash_token, read_tasks, task_id

TASKS = [
    {"id": "capital", "prompt": "What is the capital of France?",
     "completions": ["Paris.", "The capital of France is Paris.", "Paris, on the Seine.", "Lyon."], "ranks": []},
    # Model output is untrusted: the page must show this markup as text, not run it.
    {"prompt": "Say hello.", "completions": ["Hello!", "<b>hi</b><img src=x onerror=alert(1)>", "Hey"]},
    {"prompt": "Name a prime number.", "completions": ["7", "9"], "labeler": ""},
]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1200,1000"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def stored_labels(db: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT task_id, labeler, ranks FROM labels ORDER BY task_id, labeler").fetchall()


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of 127.0.0.1 in a thread; yield its base URL."""
    # Port 0 lets the OS pick a free port at bind time, so no other process can take it first.
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture()
def db(tmp_path) -> Path:
    db = tmp_path / "labels.sqlite"
    assert load_tasks(db, write_jsonl(tmp_path / "tasks.jsonl", TASKS)) == len(TASKS)
    return db


@pytest.fixture()
def live(db) -> Iterator[str]:
    with running(create_app(db)) as url:
        yield url


def client(url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def chromium_driver(profile: Path):
    """Headless Chromium under chromedriver; skip loudly when absent, but fail under CI, which installs it."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    if chromium is None or chromedriver is None or webdriver is None:
        reason = ("BROWSER TEST NOT RUN: needs Debian's `chromium` and `chromium-driver` (apt-get install "
                  f"chromium chromium-driver) and the selenium package; found chromium={chromium}, "
                  f"chromedriver={chromedriver}, selenium={webdriver is not None}")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to check the page's console
    # A driver path in the Service stops Selenium Manager from looking for (or downloading) one.
    return webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))


def test_browser_ranks_a_task_with_a_tie_and_a_fail_and_export_holds_it(db, live, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    token = add_labeler(db, "alice")
    driver = chromium_driver(tmp_path / "chromium-profile")
    try:
        wait = WebDriverWait(driver, 15)
        text = lambda element_id: driver.find_element(By.ID, element_id).text  # visible text only

        def log_in(with_token: str) -> None:
            field = driver.find_element(By.ID, "token")
            field.clear()
            field.send_keys(with_token)
            driver.find_element(By.ID, "login-button").click()

        driver.get(live)
        wait.until(lambda d: d.find_element(By.ID, "token").is_displayed())
        assert not driver.find_element(By.ID, "app").is_displayed()

        log_in("not-a-token")
        wait.until(lambda d: text("login-error") == "That token is not valid.")
        assert not driver.find_element(By.ID, "app").is_displayed()
        assert text("prompt") == ""

        log_in(token)
        wait.until(lambda d: text("prompt") == TASKS[0]["prompt"])
        assert text("labeler-name") == "alice"
        assert text("progress-text") == "0 / 3 labeled"
        assert "equal quality may share a rank" in text("instructions")
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#completions .text")]
        assert shown == TASKS[0]["completions"]

        for select, rank in zip(driver.find_elements(By.CSS_SELECTOR, "select.rank"), ["1", "2", "2", "F"]):
            Select(select).select_by_value(rank)
        driver.find_element(By.ID, "submit").click()

        wait.until(lambda d: text("prompt") == TASKS[1]["prompt"])
        assert text("progress-text") == "1 / 3 labeled"
        assert text("message") == "Saved. Here is the next task."
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#completions .text")] == TASKS[1]["completions"]
        assert driver.find_elements(By.CSS_SELECTOR, "#completions b, #completions img") == []
        overview = driver.execute_script(
            "return [...document.querySelectorAll('#overview tbody tr')].map(r => [...r.cells].map(c => c.textContent))")
        assert overview == [["alice", "1", "3"]]

        # Skip (the button) leaves the second task for later; back (key b) returns to it, then to the
        # first task with its ranks shown, which can be changed and submitted again.
        ranks_shown = lambda: [Select(e).first_selected_option.get_attribute("value")
                               for e in driver.find_elements(By.CSS_SELECTOR, "select.rank")]
        driver.find_element(By.ID, "skip").click()
        wait.until(lambda d: text("prompt") == TASKS[2]["prompt"])
        assert text("message") == "Skipped: that task comes back once the others are labeled."
        ActionChains(driver).send_keys("b").perform()
        wait.until(lambda d: text("prompt") == TASKS[1]["prompt"])
        assert text("message") == "Back to a task you skipped." and ranks_shown() == ["", "", ""]
        ActionChains(driver).send_keys("b").perform()
        wait.until(lambda d: text("prompt") == TASKS[0]["prompt"])
        assert ranks_shown() == ["1", "2", "2", "F"]
        assert "failed" in driver.find_elements(By.CSS_SELECTOR, "#completions .completion")[3].get_attribute("class")
        for select, rank in zip(driver.find_elements(By.CSS_SELECTOR, "select.rank"), ["2", "1", "1", "F"]):
            Select(select).select_by_value(rank)
        driver.find_element(By.ID, "submit").click()
        # The next task is the first one not skipped; skipping it (key s) brings the skipped one back.
        wait.until(lambda d: text("prompt") == TASKS[2]["prompt"])
        assert text("progress-text") == "1 / 3 labeled"
        ActionChains(driver).send_keys("s").perform()
        wait.until(lambda d: text("prompt") == TASKS[1]["prompt"])

        screenshot = tmp_path / "page.png"
        assert driver.save_screenshot(str(screenshot))
        png = screenshot.read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
        # No script errors or policy violations; the one expected error is the refused bad token.
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert [m for m in errors if "401 (Unauthorized)" not in m] == [], errors
    finally:
        driver.quit()

    out = tmp_path / "rankings.jsonl"
    assert export(db, out) == 1
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"id": "capital", "prompt": TASKS[0]["prompt"], "completions": TASKS[0]["completions"],
         "ranks": [2, 1, 1, "F"], "labeler": "alice"}]


def test_twenty_concurrent_labelers_lose_none_of_1000_labels(tmp_path):
    n_labelers, n_tasks = 20, 50
    tasks = [{"prompt": f"Question {i}?", "completions": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(n_tasks)]
    db = tmp_path / "labels.sqlite"
    load_tasks(db, write_jsonl(tmp_path / "tasks.jsonl", tasks))
    tokens = {f"labeler{k:02d}": add_labeler(db, f"labeler{k:02d}") for k in range(n_labelers)}
    # Each labeler ranks every task the same way, and differently from the others, so a label
    # stored under the wrong labeler or task shows up in the export.
    expected_ranks = {name: [(k + j) % 3 + 1 for j in range(3)] for k, name in enumerate(tokens)}
    start, errors = threading.Barrier(n_labelers), []

    def label_everything(name: str, url: str) -> None:
        try:
            with client(url, tokens[name]) as http:
                start.wait()
                for _ in range(n_tasks):
                    task = http.get("/api/next").raise_for_status().json()["task"]
                    http.post("/api/labels", json={"task_id": task["id"], "ranks": expected_ranks[name]}
                              ).raise_for_status()
                assert http.get("/api/next").json() == {"task": None, "done": n_tasks, "total": n_tasks}
        except Exception as e:  # reported below; an exception in a thread would otherwise vanish
            errors.append(f"{name}: {e!r}")

    with running(create_app(db)) as url:
        threads = [threading.Thread(target=label_everything, args=(name, url)) for name in tokens]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        with client(url, tokens["labeler00"]) as http:
            overview = http.get("/api/progress").json()
        assert overview == {"total": n_tasks, "labelers": [{"name": name, "done": n_tasks} for name in sorted(tokens)]}

    assert len(stored_labels(db)) == n_labelers * n_tasks
    out = tmp_path / "rankings.jsonl"
    assert export(db, out) == n_labelers * n_tasks
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({(r["id"], r["labeler"]) for r in records}) == n_labelers * n_tasks
    assert all(r["ranks"] == expected_ranks[r["labeler"]] for r in records)


def test_missing_or_bad_token_is_refused_by_every_api_route(db, live):
    good = add_labeler(db, "alice")
    routes = [("GET", "/api/me", None), ("GET", "/api/instructions", None), ("GET", "/api/next", None),
              ("GET", "/api/progress", None), ("POST", "/api/labels", {"task_id": "capital", "ranks": [1, 2, 3, 4]})]
    bad_headers = [{}, {"Authorization": "Bearer not-a-token"}, {"Authorization": f"Bearer {good}x"},
                   {"Authorization": f"Bearer {good.upper()}"}, {"Authorization": f"Basic {good}"}]
    for headers in bad_headers:
        with httpx.Client(base_url=live, headers=headers) as http:
            for method, path, body in routes:
                response = http.request(method, path, json=body)
                assert response.status_code == 401, (headers, path, response.text)
                assert "token" in response.json()["detail"]
    assert stored_labels(db) == []
    page = httpx.get(live + "/")
    assert page.status_code == 200 and 'id="login-form"' in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert TASKS[0]["prompt"] not in page.text  # the page shell carries no task data
    with client(live, good) as http:
        assert http.get("/api/me").json() == {"labeler": "alice"}


@pytest.mark.parametrize("task_id, ranks, message", [
    ("capital", [1, 2, 3], "got 3 rank(s) for 4 completions"),
    ("capital", [1, 2, 3, 4, 4], "got 5 rank(s) for 4 completions"),
    ("capital", [], "got 0 rank(s) for 4 completions"),
    ("capital", [0, 1, 2, 3], "completion 1: rank 0 is neither an integer from 1 to 4"),
    ("capital", [1, -2, 2, 3], "completion 2: rank -2 is neither"),
    ("capital", [1, 2, 5, "F"], "completion 3: rank 5 is neither"),
    ("capital", [1, 2, "G", "F"], 'completion 3: rank "G" is neither'),
    ("capital", [1, 2, "f", 3], 'completion 3: rank "f" is neither'),
    ("capital", [1.5, 2, 3, 4], "completion 1: rank 1.5 is neither"),
    ("capital", [True, 2, 3, 4], "completion 1: rank true is neither"),
    ("capital", [None, 2, 3, 4], "completion 1: rank null is neither"),
    ("capital", ["1", 2, 3, 4], 'completion 1: rank "1" is neither'),
    ("no-such-task", [1, 2, 3, 4], "no task with id 'no-such-task'"),
])
def test_invalid_submission_is_refused_with_422_and_a_clear_message(db, live, task_id, ranks, message):
    with client(live, add_labeler(db, "alice")) as http:
        response = http.post("/api/labels", json={"task_id": task_id, "ranks": ranks})
    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert stored_labels(db) == []


def test_malformed_submission_body_is_refused_with_422(db, live):
    with client(live, add_labeler(db, "alice")) as http:
        for body in [{"task_id": "capital"}, {"ranks": [1, 2, 3, 4]}, {"task_id": "capital", "ranks": "1234"}]:
            assert http.post("/api/labels", json=body).status_code == 422, body
    assert stored_labels(db) == []


def test_resubmitting_replaces_the_label_and_next_skips_labeled_tasks(db, live):
    with client(live, add_labeler(db, "alice")) as alice, client(live, add_labeler(db, "bob")) as bob:
        assert alice.get("/api/next").json()["task"]["id"] == "capital"
        assert alice.post("/api/labels", json={"task_id": "capital", "ranks": [1, 1, 2, "F"]}).json() == {"done": 1, "total": 3}
        assert alice.post("/api/labels", json={"task_id": "capital", "ranks": [2, 1, 1, 3]}).json() == {"done": 1, "total": 3}
        second = alice.get("/api/next").json()
        assert second["task"]["prompt"] == TASKS[1]["prompt"] and second["done"] == 1
        assert bob.get("/api/next").json()["task"]["id"] == "capital"  # progress is per labeler
        assert alice.post("/api/labels", json={"task_id": second["task"]["id"], "ranks": ["F", "F", "F"]}).status_code == 200
        assert bob.get("/api/progress").json() == {
            "total": 3, "labelers": [{"name": "alice", "done": 2}, {"name": "bob", "done": 0}]}
    labels = {task: (labeler, ranks) for task, labeler, ranks in stored_labels(db)}
    assert labels == {"capital": ("alice", "[2, 1, 1, 3]"), second["task"]["id"]: ("alice", '["F", "F", "F"]')}


def test_bad_task_file_lines_are_named_and_skipped_and_the_rest_loaded(tmp_path, capsys):
    from alignkit.io import take_skipped

    take_skipped()
    lines = [
        TASKS[0],
        "{not json",
        {"prompt": "", "completions": ["a", "b"]},
        {"prompt": "p", "completions": ["only one"]},
        "",
        {"prompt": "p", "completions": ["a", 2]},
        ["a", "list"],
        {"id": True, "prompt": "p", "completions": ["a", "b"]},
        {"id": "capital", "prompt": "Something else?", "completions": ["a", "b"]},
        TASKS[1],
    ]
    db = tmp_path / "labels.sqlite"
    assert load_tasks(db, write_jsonl(tmp_path / "tasks.jsonl", lines)) == 2
    path = tmp_path / "tasks.jsonl"
    assert capsys.readouterr().err.splitlines() == [f"warning: {path}:{p} (skipped)" for p in [
        "2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        '3: "prompt" must be a non-empty string',
        '4: "completions" has 1 item(s); ranking needs at least 2',
        '6: "completions" must be a list of strings',
        "7: expected a JSON object, got list",
        '8: "id" must be a non-empty string or an integer when present',
        "9: id 'capital' was already used on line 1 for a different prompt or completions"]]
    assert len(take_skipped()) == 7  # the CLI exits 3
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert [r[0] for r in conn.execute("SELECT prompt FROM tasks ORDER BY seq")] == [TASKS[0]["prompt"],
                                                                                      TASKS[1]["prompt"]]

    # A file with no usable line at all is refused, every problem listed, before the database is touched.
    with pytest.raises(DataError) as caught:
        load_tasks(tmp_path / "other.sqlite", write_jsonl(tmp_path / "bad.jsonl", lines[1:4]))
    assert caught.value.problems == ["line 1: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
                                     'line 2: "prompt" must be a non-empty string',
                                     'line 3: "completions" has 1 item(s); ranking needs at least 2']
    assert not (tmp_path / "other.sqlite").exists()


def test_loading_is_idempotent_and_ids_are_stable(db, tmp_path):
    assert load_tasks(db, tmp_path / "tasks.jsonl") == 0
    # An exported file repeats each task once per labeler and reads back as the same tasks.
    exported_like = [{**TASKS[1], "ranks": [1, 2, 3], "labeler": name} for name in ["a", "b"]]
    assert load_tasks(db, write_jsonl(tmp_path / "again.jsonl", exported_like)) == 0
    assert load_tasks(db, write_jsonl(tmp_path / "more.jsonl", [*TASKS, {"prompt": "New?", "completions": ["x", "y"]}])) == 1
    with contextlib.closing(sqlite3.connect(db)) as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM tasks ORDER BY seq")]
    assert ids == ["capital", task_id(TASKS[1]["prompt"], TASKS[1]["completions"]),
                   task_id(TASKS[2]["prompt"], TASKS[2]["completions"]), task_id("New?", ["x", "y"])]
    assert len(set(ids)) == 4 and all(len(i) == 16 for i in ids[1:])


def test_reload_that_changes_a_task_is_refused_and_changes_nothing(db, tmp_path):
    changed = [{"prompt": "Brand new?", "completions": ["x", "y"]}, {**TASKS[0], "completions": ["Paris.", "Rome."]}]
    with pytest.raises(DataError) as caught:
        load_tasks(db, write_jsonl(tmp_path / "changed.jsonl", changed))
    assert caught.value.problems == [
        "line 2: id 'capital': the database already holds a different prompt or completions under this id"]
    with contextlib.closing(sqlite3.connect(db)) as conn:  # all or nothing: the new task was not added either
        assert conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == len(TASKS)


def test_tokens_are_stored_only_as_hashes_and_replacing_revokes_the_old_one(db, live):
    token = add_labeler(db, "alice")
    assert len(token) >= 32
    on_disk = b"".join(p.read_bytes() for p in db.parent.glob(f"{db.name}*"))  # the WAL file too
    assert hash_token(token).encode() in on_disk and token.encode() not in on_disk
    with pytest.raises(AlignkitError, match="already exists"):
        add_labeler(db, "alice")
    with pytest.raises(AlignkitError, match="labeler name"):
        add_labeler(db, "bad name; drop")
    with client(live, token) as old:
        assert old.post("/api/labels", json={"task_id": "capital", "ranks": [1, 2, 3, 4]}).status_code == 200
        new_token = add_labeler(db, "alice", replace=True)
        assert new_token != token
        assert old.get("/api/me").status_code == 401
    with client(live, new_token) as new:
        assert new.get("/api/next").json()["done"] == 1  # the labels stay with the labeler


def test_export_is_atomic_and_loads_back_as_the_same_tasks(db, live, tmp_path):
    with client(live, add_labeler(db, "bob")) as bob, client(live, add_labeler(db, "alice")) as alice:
        for http in (bob, alice):
            for _ in TASKS:
                task = http.get("/api/next").json()["task"]
                http.post("/api/labels", json={"task_id": task["id"], "ranks": [1] * len(task["completions"])}
                          ).raise_for_status()
    out = tmp_path / "out" / "rankings.jsonl"
    out.parent.mkdir()
    out.write_text("stale content from an earlier export\n")
    assert export(db, out) == 2 * len(TASKS)
    assert [p.name for p in out.parent.iterdir()] == ["rankings.jsonl"]  # no temporary file left behind
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # Task load order, then labeler name.
    assert [(r["prompt"], r["labeler"]) for r in records] == [
        (t["prompt"], name) for t in TASKS for name in ["alice", "bob"]]
    assert [t.id for _, t in read_tasks(out)] == [r["id"] for r in records[::2]]
    with pytest.raises(AlignkitError, match="no label database"):
        export(tmp_path / "missing.sqlite", out)


def test_instructions_are_the_shipped_file_unless_overridden(db, tmp_path):
    default = DEFAULT_INSTRUCTIONS.read_text()
    assert all(word in default.lower() for word in ["helpful", "honest", "harmless", "equal quality", "**f**"])
    custom = tmp_path / "instructions.md"
    custom.write_text("# Rank by brevity\n\nShorter is better.\n")
    token = add_labeler(db, "alice")
    for path, expected in [(None, default), (custom, custom.read_text())]:
        with running(create_app(db, instructions_path=path)) as url, client(url, token) as http:
            assert http.get("/api/instructions").json() == {"markdown": expected}
    with pytest.raises(FileNotFoundError):
        create_app(db, instructions_path=tmp_path / "missing.md")


def test_serve_loads_the_tasks_and_serves_the_app_until_stopped(tmp_path):
    db, tasks = tmp_path / "labels.sqlite", write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    token = add_labeler(db, "alice")
    with socket.socket() as probe:  # a port free a moment ago; serve() takes a number, as the CLI does
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    src = str(Path(alignkit.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = f"from alignkit.feedback.label_app import serve; serve({str(db)!r}, {str(tasks)!r}, port={port})"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/next", headers={"Authorization": f"Bearer {token}"})
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "serve() did not start"
                time.sleep(0.1)
        assert response.json()["task"]["id"] == "capital" and response.json()["total"] == len(TASKS)
    finally:
        proc.terminate()
        stderr = proc.communicate(timeout=15)[1]
    assert f"{tasks}: {len(TASKS)} new task(s)" in stderr
    assert f"labeling at http://127.0.0.1:{port}/" in stderr


def test_importing_a_ranked_file_keeps_its_labels_per_labeler(tmp_path):
    """An exported file (or a judge's rankings) loads back with every labeler's ranks; a label the
    database already holds is kept; ranks that do not fit, or one labeler ranking a task two ways,
    are named by line and skipped."""
    from alignkit.feedback.label_store import load_rankings
    from alignkit.io import take_skipped

    db = tmp_path / "labels.sqlite"
    capital = {k: TASKS[0][k] for k in ("id", "prompt", "completions")}
    ranked = [{**capital, "ranks": [1, 2, 2, "F"], "labeler": "alice"},
              {**capital, "ranks": [4, 3, 2, 1], "labeler": "bob"},
              {**TASKS[1], "ranks": [1, 1, 2], "labeler": "judge:safe*-2.0"},
              {**TASKS[1], "ranks": [1, 1, 2], "labeler": "judge:safe*-2.0"},  # repeated, same ranks: once
              {**TASKS[2], "ranks": [], "labeler": None}]
    token = add_labeler(db, "alice")
    assert load_rankings(db, write_jsonl(tmp_path / "ranked.jsonl", ranked)) == (3, 3)
    second = task_id(TASKS[1]["prompt"], TASKS[1]["completions"])
    assert stored_labels(db) == sorted([("capital", "alice", '[1, 2, 2, "F"]'), ("capital", "bob", "[4, 3, 2, 1]"),
                                        (second, "judge:safe*-2.0", "[1, 1, 2]")])
    with contextlib.closing(sqlite3.connect(db)) as conn:  # alice keeps her token; bob is known, without one
        assert conn.execute("SELECT token_sha256 FROM labelers WHERE name = 'alice'").fetchone()[0] == hash_token(token)
        assert conn.execute("SELECT COUNT(*) FROM labelers").fetchone()[0] == 3
    # Loading an older file again keeps the database's labels: they are the newer work.
    older = [{**capital, "ranks": [2, 1, 1, 1], "labeler": "alice"}]
    assert load_rankings(db, write_jsonl(tmp_path / "older.jsonl", older)) == (0, 0)
    assert ("capital", "alice", '[1, 2, 2, "F"]') in stored_labels(db)
    # Ranks that do not fit, ranks without a labeler, one labeler ranking a task two ways: each line
    # is named and skipped, and the good label is kept.
    bad = [{**capital, "ranks": [1, 2], "labeler": "carol"}, {**capital, "ranks": [1, 2, 3, 4]},
           {**capital, "ranks": [1, 1, 1, 1], "labeler": "dan"}, {**capital, "ranks": [2, 2, 2, 2], "labeler": "dan"}]
    take_skipped()
    assert load_rankings(db, write_jsonl(tmp_path / "bad.jsonl", bad)) == (0, 1)
    assert [w.split(":", 2)[1:] for w in take_skipped()] == [
        ["1", " got 2 rank(s) for 4 completions; give one per completion"],
        ["2", ' ranks without a "labeler": whose ranking is it?'],
        ["4", " dan already ranked this task differently on line 3"]]
    assert ("capital", "dan", "[1, 1, 1, 1]") in stored_labels(db) and len(stored_labels(db)) == 4


def test_skip_passes_over_tasks_until_only_skipped_ones_are_left_and_back_shows_ranks(db, live):
    token = add_labeler(db, "alice")
    second = task_id(TASKS[1]["prompt"], TASKS[1]["completions"])
    with client(live, token) as c:
        assert c.get("/api/next", params={"skip": ["capital"]}).json()["task"]["id"] == second
        assert c.get("/api/next", params={"skip": ["capital", second]}).json()["task"]["prompt"] == TASKS[2]["prompt"]
        everything = ["capital", second, task_id(TASKS[2]["prompt"], TASKS[2]["completions"])]
        assert c.get("/api/next", params={"skip": everything}).json()["task"]["id"] == "capital"  # skipped come back
        assert c.get("/api/task/capital").json() == {"task": {k: TASKS[0][k] for k in ("id", "prompt", "completions")},
                                                     "ranks": None}
        assert c.post("/api/labels", json={"task_id": "capital", "ranks": [1, 2, 3, 4]}).status_code == 200
        assert c.get("/api/task/capital").json()["ranks"] == [1, 2, 3, 4]
        missing = c.get("/api/task/nope")
        assert missing.status_code == 404 and missing.json()["detail"] == "no task with id 'nope'"
        assert client(live, None).get("/api/task/capital").status_code == 401
