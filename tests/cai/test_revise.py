"""The critique-and-revise loop with a scripted chat model (a test double): the trace records every
step under the sampled principle, and the dataset is what `alignkit train sft` reads."""

from __future__ import annotations

import random

from alignkit.cai.constitution import sample_principle, select_principles
from alignkit.cai.revise import critique_revise, sft_records
from alignkit.data.sft import load_conversations
from alignkit.io import write_jsonl


class ScriptedChatDouble:
    """Test double for a chat model: answers a critique request with 'critique N' and a revision
    request with 'Revision: fixed N' (N counts its calls), and records every conversation it saw."""

    def __init__(self, empty_revision_for: str | None = None):
        self.seen: list[list[dict]] = []
        self.calls = 0
        self.empty_revision_for = empty_revision_for

    def __call__(self, conversations):
        self.calls += 1
        replies = []
        for conv in conversations:
            self.seen.append(conv)
            last = conv[-1]["content"]
            if last.startswith("Critique request:"):
                replies.append(f"critique {self.calls}")
            elif conv[0]["content"] == self.empty_revision_for:
                replies.append("  ")
            else:
                replies.append(f"Revision: fixed {self.calls}")
        return replies


def test_two_rounds_trace_every_step_and_feed_revisions_forward(tmp_path):
    principles = select_principles("dialogue_rules")
    chat = ScriptedChatDouble(empty_revision_for="second prompt")
    traces = critique_revise(["first prompt", "second prompt"], ["rude answer", "other answer"], principles,
                             chat, rounds=2, seed=7, progress=False)

    # The principles are the seeded draws, one per prompt per round, in that order.
    rng = random.Random(7)
    expected = [[sample_principle(principles, rng) for _ in range(2)] for _ in range(2)]
    first = traces[0]
    assert [r["principle"] for r in first["rounds"]] == [expected[0][0].key, expected[1][0].key]
    assert first["rounds"][0]["critique_request"].startswith("Critique request: " + expected[0][0].critique_request)
    assert first["rounds"][0]["revision_request"].startswith("Revision request: " + expected[0][0].revision_request)
    # Calls: 1 critique, 2 revision (round 1), 3 critique, 4 revision (round 2); "Revision:" is stripped.
    assert [(r["critique"], r["revision"]) for r in first["rounds"]] == [("critique 1", "fixed 2"),
                                                                         ("critique 3", "fixed 4")]
    assert first["initial_response"] == "rude answer" and first["final"] == "fixed 4"
    # Round 2 critiques round 1's revision: the conversation shows it as the assistant's reply.
    round2 = [c for c in chat.seen if c[0]["content"] == "first prompt" and len(c) == 3][1]
    assert round2[1] == {"role": "assistant", "content": "fixed 2"}
    # The revision turn carries the critique the model just gave.
    revision_conv = [c for c in chat.seen if c[0]["content"] == "first prompt" and len(c) == 5][0]
    assert revision_conv[3] == {"role": "assistant", "content": "critique 1"}

    # An empty revision keeps the previous response and says so.
    second = traces[1]
    assert [r["kept_previous"] for r in second["rounds"]] == [True, True]
    assert second["final"] == "other answer"

    data = sft_records(traces)
    assert data == [{"prompt": "first prompt", "completion": "fixed 4"},
                    {"prompt": "second prompt", "completion": "other answer"}]
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, data)
    convs = load_conversations(path)
    assert convs[0] == [{"role": "user", "content": "first prompt"}, {"role": "assistant", "content": "fixed 4"}]
