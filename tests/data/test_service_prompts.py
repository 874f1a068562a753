"""The demo's customer-service prompt sets: disjoint in templates and slot values, and reproducible."""

from alignkit.data import service_prompts as sp


def test_heldout_shares_no_template_or_slot_value_with_training():
    sets = sp.generate_sets()
    assert {k: len(v) for k, v in sets.items()} == {"train": 400, "val": 48, "heldout": 120}
    train = sets["train"] + sets["val"]
    for field in ("template", "name", "product", "problem", "order"):
        seen = {getattr(p, field) for p in train}
        assert not seen & {getattr(p, field) for p in sets["heldout"]}, field
    # No held-out prompt contains a training product, problem or name anywhere in its text.
    slots = sp.read_slots()["train"]
    for p in sets["heldout"]:
        for value in slots["products"] + slots["problems"] + slots["names"]:
            assert value not in p.text, (value, p.text)
    texts = [p.text for s in sets.values() for p in s]
    assert len(set(texts)) == len(texts)  # the validation slice is not a copy of training prompts
    # Every tone, polite to hostile, is in every set.
    assert all({p.tone for p in s} == {0, 1, 2, 3} for s in sets.values())


def test_regeneration_reproduces_the_shipped_files(tmp_path):
    assert sp.main(["--check"]) == 0
    assert sp.main(["--out", str(tmp_path)]) == 0
    for name in sp.FILES.values():
        assert (tmp_path / name).read_text() == (sp.EXAMPLES_DIR / name).read_text()
    (tmp_path / sp.FILES["heldout"]).write_text("edited\n")
    assert sp.main(["--check", "--out", str(tmp_path)]) == 1
