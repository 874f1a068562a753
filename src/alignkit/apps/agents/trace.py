"""Agent traces: one JSONL record per event of a run (start, every step, end), and a plain-text rendering of them.

A trace file can hold many runs, appended one after another; every record carries the `run` id
of its run. The records:

* `{"event": "start", "run", "question", "tools": [names], "max_steps", "time"}`
* `{"event": "step", "run", "step", "prompt_chars", "prompt_tokens" (null when the backend cannot
  count them), "latency_s" (model call), "output" (the model's reply), "plan", "thought", "tool",
  "arguments", "observation", "tool_latency_s", "final_answer", "error_kind", "error", "protocol"
  (how the reply was obtained: grammar, tool_calls, tools_text or text), "protocol_note"}`
* `{"event": "end", "run", "status", "answer", "message", "steps"}`

`error_kind` is null for a good step, else "format" (unparseable reply), "unknown_tool",
"arguments" (arguments that do not fit the tool), "tool_error" (the tool raised) or "repeated"
(the same call was made before). Records are flushed one by one, so a run that crashes or is
killed keeps the steps it made.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from alignkit.io import JsonlLog, read_jsonl


class TraceLog:
    """Appends the records of one agent run to a JSONL file."""

    def __init__(self, path: Path):
        self.run = uuid.uuid4().hex[:12]
        self._log = JsonlLog(Path(path))

    def write(self, event: str, **fields) -> None:
        self._log.write({"event": event, "run": self.run, **fields})

    def start(self, question: str, tool_names: list[str], max_steps: int) -> None:
        self.write("start", question=question, tools=tool_names, max_steps=max_steps,
                   time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def close(self) -> None:
        self._log.close()


def read_trace(path: Path) -> list[dict]:
    """The records of a trace file, in order; DataError listing every line that is not a JSON object."""
    return [record for _, record in read_jsonl(Path(path))]


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in str(text).splitlines()) or prefix.rstrip()


def render_trace(records: list[dict]) -> str:
    """A readable plain-text account of the runs in `records`: step headers, thought, action,
    observation; errors are marked with "!!" at the start of the line so they stand out (and can be
    grepped) without colours."""
    lines: list[str] = []
    for r in records:
        event = r.get("event")
        if event == "start":
            lines.append(f"=== run {r.get('run')}  {r.get('time', '')}".rstrip())
            lines.append(f"question: {r.get('question')}")
            lines.append(f"tools: {', '.join(r.get('tools') or [])}   (at most {r.get('max_steps')} steps)")
        elif event == "step":
            size = f"{r.get('prompt_chars')} chars"
            if r.get("prompt_tokens") is not None:
                size += f", {r['prompt_tokens']} tokens"
            via = f"; via {r['protocol']}" if r.get("protocol") else ""
            lines.append(f"\n--- step {r.get('step')}   prompt {size}; model {r.get('latency_s', 0):.2f} s{via}")
            if r.get("protocol_note"):
                lines.append(f"note: {r['protocol_note']}")
            if r.get("plan"):
                lines.append(f"plan:\n{_indent(r['plan'])}")
            if r.get("thought"):
                lines.append(f"thought:\n{_indent(r['thought'])}")
            if r.get("error_kind") == "format":
                # There is no thought or action to show: the raw reply is what went wrong.
                lines.append(f"model output:\n{_indent(r.get('output') or '(empty)')}")
            if r.get("tool"):
                arguments = json.dumps(r.get("arguments"), ensure_ascii=False) if r.get("arguments") is not None else "(none)"
                took = f"   ({r['tool_latency_s']:.2f} s)" if r.get("tool_latency_s") is not None else ""
                lines.append(f"action: {r['tool']} {arguments}{took}")
            if r.get("error_kind"):
                lines.append(f"!! error ({r['error_kind']}): {r.get('error')}")
            if r.get("observation") is not None:
                lines.append(f"observation:\n{_indent(r['observation'])}")
            if r.get("final_answer") is not None:
                lines.append(f"final answer: {r['final_answer']}")
        elif event == "end":
            status = r.get("status")
            mark = "===" if status == "answered" else "!! ==="
            lines.append(f"\n{mark} {status}: {r.get('message')}")
            if r.get("answer") is not None:
                lines.append(f"answer: {r['answer']}")
            lines.append("")
        else:
            lines.append(f"!! unknown record: {json.dumps(r, ensure_ascii=False)}")
    return "\n".join(lines).rstrip() + "\n"
