// The labeling page: log in with a token, then rank one task's completions at a time; skip a task
// for later (key s) or go back to the previous one to change its ranks (key b).
//
// The token is kept in localStorage so a labeler logs in once per browser, and every API call
// sends it as a bearer token. Prompts and completions are model output: they are only ever
// placed with textContent, never parsed as HTML.
"use strict";

const TOKEN_KEY = "alignkit-label-token";
const FAIL = "F";

let token = localStorage.getItem(TOKEN_KEY);
let currentTask = null;
const history = [];  // ids of the tasks shown before the current one, oldest first, for "back"
const skipped = new Set();  // ids passed over with "skip": they come back once the others are done

const $ = (id) => document.getElementById(id);

class AuthError extends Error {}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Authorization": `Bearer ${token}`, "Content-Type": "application/json" },
  });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) throw new AuthError(body.detail || "token not recognised");
  if (!response.ok) throw new Error(describeError(body.detail, response.status));
  return body;
}

// FastAPI sends a string for our own errors and a list of {loc, msg} for malformed requests.
function describeError(detail, status) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  return `request failed (HTTP ${status})`;
}

function showLogin(error) {
  token = null;
  localStorage.removeItem(TOKEN_KEY);
  $("app").hidden = true;
  $("whoami").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = error || "";
  $("token").value = "";
  $("token").focus();
}

async function start() {
  try {
    const me = await api("api/me");
    localStorage.setItem(TOKEN_KEY, token);
    $("labeler-name").textContent = me.labeler;
    $("whoami").hidden = false;
    $("login").hidden = true;
    $("app").hidden = false;
    renderMarkdown((await api("api/instructions")).markdown, $("instructions"));
    await loadNext();
  } catch (e) {
    if (e instanceof AuthError) showLogin("That token is not valid.");
    else if ($("app").hidden) $("login-error").textContent = e.message;
    else setMessage(e.message, true);
  }
}

async function loadNext() {
  const query = [...skipped].map((id) => `skip=${encodeURIComponent(id)}`).join("&");
  const next = await api(`api/next${query ? "?" + query : ""}`);
  showTask(next.task, null);
  showProgress(next.done, next.total);
  await loadOverview();
}

function showTask(task, ranks) {
  currentTask = task;
  $("label-form").hidden = task === null;
  $("all-done").hidden = task !== null;
  $("back").disabled = history.length === 0;
  if (task !== null) renderTask(task, ranks);
}

// Leave the current task for later: it comes back once every other task is labeled.
async function skipTask() {
  if (currentTask === null) return;
  skipped.add(currentTask.id);
  history.push(currentTask.id);
  await guarded(async () => {
    await loadNext();
    setMessage("Skipped: that task comes back once the others are labeled.");
  });
}

// Show the task before this one again, with the ranks given to it (if any), to change them.
async function goBack() {
  if (history.length === 0) {
    setMessage("There is no earlier task in this session.", true);
    return;
  }
  const id = history.pop();
  await guarded(async () => {
    const { task, ranks } = await api(`api/task/${encodeURIComponent(id)}`);
    showTask(task, ranks);
    setMessage(ranks === null ? "Back to a task you skipped." : "Back to a task you ranked: submit to change its ranks.");
  });
}

async function guarded(action) {
  try {
    await action();
  } catch (e) {
    if (e instanceof AuthError) showLogin("Your token is no longer valid.");
    else setMessage(e.message, true);
  }
}

function showProgress(done, total) {
  $("progress-text").textContent = `${done} / ${total} labeled`;
  $("progress-bar").max = Math.max(total, 1);
  $("progress-bar").value = done;
}

function renderTask(task, ranks) {
  $("prompt").textContent = task.prompt;
  const list = $("completions");
  list.replaceChildren();
  const n = task.completions.length;
  task.completions.forEach((text, i) => {
    const row = document.createElement("div");
    row.className = "completion";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    const select = document.createElement("select");
    select.className = "rank";
    select.dataset.index = String(i);
    select.setAttribute("aria-label", `Rank of completion ${i + 1}`);
    select.append(new Option("rank…", ""));
    for (let r = 1; r <= n; r++) select.append(new Option(String(r), String(r)));
    select.append(new Option("F (fails)", FAIL));
    if (ranks) select.value = String(ranks[i]);
    row.classList.toggle("failed", select.value === FAIL);
    select.addEventListener("change", () => row.classList.toggle("failed", select.value === FAIL));
    row.append(body, select);
    const item = document.createElement("li");
    item.append(row);
    list.append(item);
  });
  setMessage("");
  window.scrollTo(0, 0);
}

async function submitRanking(event) {
  event.preventDefault();
  const values = [...document.querySelectorAll("select.rank")].map((s) => s.value);
  if (values.includes("")) {
    setMessage("Give every completion a rank, or F.", true);
    return;
  }
  const ranks = values.map((v) => (v === FAIL ? FAIL : Number(v)));
  $("submit").disabled = true;
  try {
    await api("api/labels", { method: "POST", body: JSON.stringify({ task_id: currentTask.id, ranks }) });
    skipped.delete(currentTask.id);
    history.push(currentTask.id);
    await loadNext();
    setMessage("Saved. Here is the next task.");
  } catch (e) {
    if (e instanceof AuthError) showLogin("Your token is no longer valid.");
    else setMessage(e.message, true);
  } finally {
    $("submit").disabled = false;
  }
}

async function loadOverview() {
  const overview = await api("api/progress");
  const rows = overview.labelers.map(({ name, done }) => {
    const row = document.createElement("tr");
    for (const value of [name, done, overview.total]) {
      const cell = document.createElement("td");
      cell.textContent = String(value);
      row.append(cell);
    }
    return row;
  });
  $("overview").tBodies[0].replaceChildren(...rows);
}

function setMessage(text, isError = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", isError);
}

// Enough Markdown for instructions: headings, bullet and numbered lists, paragraphs, **bold** and
// `code`. Built from DOM nodes, so an instructions file cannot inject markup either.
function renderMarkdown(markdown, container) {
  container.replaceChildren();
  let list = null;
  let item = null;
  let paragraph = null;
  for (const line of markdown.split("\n")) {
    const heading = line.match(/^(#{1,4})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (!line.trim()) {
      list = item = paragraph = null;
    } else if (heading) {
      list = item = paragraph = null;
      container.append(inline(document.createElement(`h${heading[1].length + 2}`), heading[2]));
    } else if (bullet || numbered) {
      const tag = bullet ? "UL" : "OL";
      if (!list || list.tagName !== tag) container.append((list = document.createElement(tag)));
      paragraph = null;
      list.append((item = inline(document.createElement("li"), (bullet || numbered)[1])));
    } else if (item && /^\s/.test(line)) {
      item.append(" ");  // an indented line continues the list item above it
      inline(item, line.trim());
    } else if (paragraph) {
      paragraph.append(" ");
      inline(paragraph, line.trim());
    } else {
      list = item = null;
      container.append((paragraph = inline(document.createElement("p"), line.trim())));
    }
  }
}

function inline(element, text) {
  for (const part of text.split(/(\*\*[^*]+\*\*|`[^`]+`)/)) {
    if (part.startsWith("**") && part.endsWith("**") && part.length > 4) {
      element.append(Object.assign(document.createElement("strong"), { textContent: part.slice(2, -2) }));
    } else if (part.startsWith("`") && part.endsWith("`") && part.length > 2) {
      element.append(Object.assign(document.createElement("code"), { textContent: part.slice(1, -1) }));
    } else if (part) {
      element.append(part);
    }
  }
  return element;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    start();
  });
  $("logout").addEventListener("click", () => showLogin(""));
  $("label-form").addEventListener("submit", submitRanking);
  $("skip").addEventListener("click", skipTask);
  $("back").addEventListener("click", goBack);
  // Shortcuts: s skips, b goes back; not while typing a token or with a modifier held.
  document.addEventListener("keydown", (event) => {
    if ($("app").hidden || event.ctrlKey || event.metaKey || event.altKey || event.target.tagName === "INPUT") return;
    if (event.key === "s" || event.key === "b") {
      event.preventDefault();
      (event.key === "s" ? skipTask : goBack)();
    }
  });
  if (token) start();
  else showLogin("");
});
