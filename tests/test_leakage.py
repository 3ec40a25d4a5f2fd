"""No evaluation item of any shipped spec occurs in the training data that spec produces (fotlab.eval.leakage).

For every spec under experiments/ (sweeps: their base spec with the sweep's `set`), the whole training document
set of every offline source is generated exactly as training does (synthetic sources: all n_docs documents, the
set the packer cycles through at any number of steps), and so are the evaluation items of the spec's eval.split:
dictionary definitions, passkeys, spans of repeat-source documents, validation documents, few-shot queries.
Hub-only recipes (GPU specs whose sources and tokenizer need the network) cannot be generated here; for them the
test checks that no synthetic source feeds training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fotlab.data import byte_tokenizer
from fotlab.data.splits import SPLITS, item_split
from fotlab.eval.leakage import check_spec
from fotlab.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "experiments").glob("**/*.yaml"))
SYNTHETIC = ("dictionary_lookup", "passkey", "repeat")


def _load(path: Path):
    import yaml

    if "base" in (yaml.safe_load(path.read_text()) or {}):  # a sweep spec: its base spec + the sweep's `set`
        from fotlab.spec.sweep import load_sweep, trial_spec

        return trial_spec(load_sweep(path, check_paths=False), {}, check_paths=False)
    return load_spec(path, check_paths=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("leakage-cache"))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_no_evaluation_item_occurs_in_the_training_data(path, cache_dir, monkeypatch):
    monkeypatch.chdir(ROOT)  # specs name their data relative to the repository root
    spec = _load(path)
    if spec.data.tokenizer.kind != "byte":  # GPU recipes: hub corpora and a hub tokenizer
        assert all(s.kind == "hf" and not s.path for s in spec.data.sources), path.name
        assert not any(s.kind in SYNTHETIC for s in spec.data.sources)
        return
    report = check_spec(spec, byte_tokenizer(), cache_dir)
    assert report.unchecked == []
    assert sum(report.checked.values()) > 0 or not spec.eval.selected(), f"{path.name}: no evaluation item checked"
    assert report.clean, {family: sorted(items, key=repr)[:5] for family, items in report.overlaps.items() if items}


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_paper_specs_report_the_test_split(path):
    assert load_spec(path, check_paths=False).eval.split == "test"


def test_item_splits_are_a_partition_with_the_stated_shares():
    splits = [item_split("passkey", k) for k in range(1, 50001)]
    shares = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert shares["train"] == pytest.approx(0.8, abs=0.01) and shares["test"] == pytest.approx(0.1, abs=0.01)


def test_generators_emit_only_items_of_their_split():
    from fotlab.data.synthetic import definition_split, dictionary_lookup_doc, dictionary_records, draw_passkey

    for split in SPLITS:
        rng = np.random.default_rng(0)
        ids, _ = dictionary_lookup_doc(rng, doc_len=400, key_len=2, value_len=4, split=split)
        assert {definition_split(k, v) for k, v in dictionary_records(ids, 2, 4)} == {split}
        assert {item_split("passkey", draw_passkey(rng, 50000, split)) for _ in range(50)} == {split}
