"""The embedded tiny checkpoints: deterministic bytes, loadable by transformers and by ref."""

import filecmp

import pytest

from ref.models import tiny_checkpoint
from tests.hf_configs import FAMILIES


def test_same_seed_byte_identical(tmp_path):
    a = tiny_checkpoint(seed=3, cache_dir=tmp_path / "a")
    b = tiny_checkpoint(seed=3, cache_dir=tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names and "config.json" in names
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == []


def test_different_seed_different_weights(tmp_path):
    a = tiny_checkpoint(seed=1, cache_dir=tmp_path)
    b = tiny_checkpoint(seed=2, cache_dir=tmp_path)
    assert not filecmp.cmp(a / "model.safetensors", b / "model.safetensors", shallow=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_in_ref(tmp_path, family):
    from ref.model import load_model

    model = load_model(tiny_checkpoint(family, cache_dir=tmp_path, tokenizer=False))
    assert model.config.model_type == family


def test_unknown_override_and_family_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown config overrides"):
        tiny_checkpoint(cache_dir=tmp_path, hidden_sizee=3)
    with pytest.raises(ValueError, match="family"):
        tiny_checkpoint("gpt2", cache_dir=tmp_path)


def test_loader_rejects_mismatched_checkpoint(tmp_path):
    import json

    from ref.model import load_model

    path = tiny_checkpoint(cache_dir=tmp_path / "m", tokenizer=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing="):
        load_model(path)
