"""SFT data: validation with line numbers, and prompt masking on the chat template."""

import json

import pytest

from alignkit.data.sft import IGNORE, build_examples, collate, load_conversations, tokenize_conversation
from alignkit.errors import DataError


def test_bad_lines_are_named_and_skipped_and_the_good_ones_used(tmp_path, capsys):
    from alignkit.io import take_skipped

    take_skipped()
    p = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "hi", "completion": "hello"}),
        json.dumps({"prompt": "hi"}),
        "{oops",
        json.dumps({"prompt": "", "completion": "x"}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
    ]
    p.write_text("\n".join(lines) + "\n")
    assert load_conversations(p) == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {p}:{problem} (skipped)" for problem in [
        "2: missing field 'completion' (expected prompt+completion or messages)",
        "3: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        "4: field 'prompt' must be a non-empty string",
        "5: no assistant message, so nothing to learn",
        "6: messages[0] needs 'role' (one of ['assistant', 'system', 'tool', 'user']) and string 'content'",
    ]]
    assert len(take_skipped()) == 5  # the CLI turns these into exit code 3
    # With no usable line the file is refused, every problem listed in line order.
    p.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations(p)
    assert [problem.split(":")[0] for problem in e.value.problems] == [f"line {n}" for n in (1, 2, 3, 4, 5)]
    assert take_skipped() == []


def test_labels_cover_exactly_the_assistant_turns(tiny):
    _, tok = tiny
    msgs = [{"role": "user", "content": "Where is my order?"},
            {"role": "assistant", "content": "Open Orders."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You are welcome."}]
    ex = tokenize_conversation(tok, msgs, max_length=512)
    assert len(ex.input_ids) == len(ex.labels)
    spans, cur = [], []
    for tok_id, lab in zip(ex.input_ids, ex.labels):
        if lab == IGNORE:
            if cur:
                spans.append(cur)
                cur = []
        else:
            assert lab == tok_id
            cur.append(lab)
    spans.append(cur) if cur else None
    # Each assistant turn, with its end-of-turn marker, is labelled; nothing else is.
    assert [tok.decode(s) for s in spans] == ["Open Orders.<|im_end|>\n", "You are welcome.<|im_end|>\n"]
    text = tok.decode(ex.input_ids)
    assert text.startswith("<|im_start|>user\nWhere is my order?<|im_end|>\n<|im_start|>assistant\n")


def test_truncation_that_leaves_no_completion_is_reported(tiny, tmp_path):
    _, tok = tiny
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"prompt": "word " * 200, "completion": "x"}) + "\n"
                 + json.dumps({"prompt": "short", "completion": "fine"}) + "\n")
    examples, notes = build_examples(tok, p, max_length=32)
    assert len(examples) == 1 and len(notes) == 1 and "record 1" in notes[0]


def test_collate_right_pads():
    from alignkit.data.sft import Example

    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
