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


def test_read_jsonl_salvaged_uses_good_lines_and_names_bad_ones(tmp_path, capsys):
    from alignkit.io import read_jsonl_salvaged, take_skipped

    take_skipped()
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\nnot json\n[1]\n{"b": 2}\n{"c": ')
    assert read_jsonl_salvaged(p) == [(1, {"a": 1}), (4, {"b": 2})]
    err = capsys.readouterr().err
    assert f"{p}:2: invalid JSON" in err and f"{p}:3: expected a JSON object" in err and f"{p}:5: invalid JSON" in err
    assert len(take_skipped()) == 3 and take_skipped() == []
    p.write_text("not json\n")
    with pytest.raises(DataError, match="line 1: invalid JSON"):
        read_jsonl_salvaged(p)


def test_resumable_output_cuts_back_to_the_last_recorded_batch(tmp_path):
    from alignkit.io import ResumableJsonl

    out = tmp_path / "out.jsonl"
    w = ResumableJsonl(out, {"seed": 1})
    assert (w.done, w.resumed) == (0, False)
    w.append([{"i": 0}, {"i": 1}], done=2)
    w.append([{"i": 2}], done=3)
    with open(out, "a") as f:
        f.write('{"i": 3}\n{"i"')  # a batch written but not recorded, and a torn line: both dropped
    w = ResumableJsonl(out, {"seed": 1})
    assert (w.done, w.resumed, w.complete) == (3, True, False)
    assert out.read_text() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n' and w.records()[-1] == {"i": 2}
    w.append([{"i": 3}], done=4)
    w.finish()
    assert ResumableJsonl(out, {"seed": 1}).complete and len(out.read_text().splitlines()) == 4


def test_resumable_output_refuses_other_arguments_until_finished_or_restarted(tmp_path):
    from alignkit.errors import AlignkitError
    from alignkit.io import ResumableJsonl

    out = tmp_path / "out.jsonl"
    ResumableJsonl(out, {"seed": 1, "n": 2}).append([{"i": 0}], done=1)
    with pytest.raises(AlignkitError, match="unfinished job with other arguments \\(seed differ\\).*--restart"):
        ResumableJsonl(out, {"seed": 2, "n": 2})
    assert out.read_text() == '{"i": 0}\n'  # refused without touching the output
    w = ResumableJsonl(out, {"seed": 2, "n": 2}, restart=True)
    assert (w.done, out.read_text()) == (0, "")
    w.finish()
    assert ResumableJsonl(out, {"seed": 3, "n": 2}).done == 0  # a finished job is simply replaced


def test_batch_seed_is_a_pure_function_of_seed_and_position():
    from alignkit.io import batch_seed

    assert batch_seed(0, 8) == batch_seed(0, 8)
    assert len({batch_seed(s, i) for s in range(4) for i in range(0, 64, 8)}) == 32
