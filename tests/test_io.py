"""Atomic files and directories, and JSONL reading that reports every bad line."""

import pytest

from alignkit.errors import DataError
from alignkit.io import atomic_dir, read_jsonl, truncate_jsonl_after


def test_read_jsonl_reports_all_bad_lines(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\nnot json\n\n[1, 2]\n{"b": 2}\n')
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert e.value.problems[0].startswith("line 2: invalid JSON")
    assert e.value.problems[1] == "line 4: expected a JSON object, got list"
    assert str(p) in str(e.value)


def test_read_jsonl_keeps_line_numbers(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert read_jsonl(p) == [(1, {"a": 1}), (3, {"b": 2})]


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_existing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_truncate_after_step_drops_later_and_cut_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    truncate_jsonl_after(p, 2)
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n'
