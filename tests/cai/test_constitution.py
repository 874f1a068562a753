"""Constitution files: the shipped ones load, bad files fail with file, line, principle and reason,
and selections pick principles by file and id."""

from __future__ import annotations

import random

import pytest

from alignkit.cai.constitution import (PRINCIPLE_KEYS, load_constitution, sample_principle, select_principles,
                                       shipped)
from alignkit.errors import ConfigError


def test_shipped_constitutions_load_with_every_field():
    assert shipped() == ["dialogue_rules", "human_rights", "platform_terms"]
    ids = {name: [p.id for p in load_constitution_named(name).principles] for name in shipped()}
    assert {"privacy", "no_torture", "non_discrimination"} <= set(ids["human_rights"])
    assert {"honest_identity", "private_information"} <= set(ids["platform_terms"])
    assert {"no_body", "no_relationship", "no_professional_advice", "no_insults"} <= set(ids["dialogue_rules"])
    for name in shipped():
        for p in load_constitution_named(name).principles:
            assert all(getattr(p, k).strip() for k in PRINCIPLE_KEYS), p


def load_constitution_named(name):
    from alignkit.cai.constitution import CONSTITUTIONS_DIR

    return load_constitution(CONSTITUTIONS_DIR / f"{name}.yaml")


GOOD = """name: mine
principles:
  - id: kind
    text: Choose the kinder response.
    critique_request: Say how the response is unkind.
    revision_request: Rewrite it kindly.
"""


def test_own_file_loads_and_is_selectable(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD)
    [p] = select_principles(f"{path}")
    assert (p.key, p.text) == ("mine:kind", "Choose the kinder response.")


def test_every_problem_is_named_with_file_line_and_principle(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD + """  - id: kind
    text: Choose the braver response.
    critique_request: ''
    revison_request: typo
  - text: no id here
""")
    with pytest.raises(ConfigError) as e:
        load_constitution(path)
    msg = str(e.value)
    assert f"{path}:7: principles[1] (id 'kind'): id 'kind' is used twice" in msg
    assert f"{path}:7: principles[1] (id 'kind'): unknown key 'revison_request'" in msg
    assert f"{path}:7: principles[1] (id 'kind'): missing 'revision_request'" in msg
    assert "'critique_request' must be a non-empty string" in msg
    assert f"{path}:11: principles[2]: missing 'id'" in msg


def test_unknown_top_level_key_and_empty_principles_are_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nprinciple: []\n")
    with pytest.raises(ConfigError, match="unknown key 'principle'.*\n.*'principles' must be a non-empty list"):
        load_constitution(path)


def test_selection_by_file_and_ids():
    chosen = select_principles("human_rights:privacy+no_torture,dialogue_rules,human_rights:privacy")
    keys = [p.key for p in chosen]
    assert keys[:2] == ["human_rights:privacy", "human_rights:no_torture"]
    assert len(keys) == 2 + len(load_constitution_named("dialogue_rules").principles)  # the repeat counts once
    with pytest.raises(ConfigError, match="has no principle 'privcy'; it has: freedom_equality"):
        select_principles("human_rights:privcy")
    with pytest.raises(ConfigError, match="no constitution 'sparrow'"):
        select_principles("sparrow")


def test_sampling_is_seeded_and_uses_every_principle():
    principles = select_principles("dialogue_rules")
    draws = [sample_principle(principles, random.Random(3)).id for _ in range(2)]
    assert draws[0] == draws[1]
    rng = random.Random(0)
    assert {sample_principle(principles, rng).id for _ in range(200)} == {p.id for p in principles}
