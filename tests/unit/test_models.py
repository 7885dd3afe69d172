"""Model initialisation: `init: scratch` keeps the architecture and tokenizer, never the weights."""

from __future__ import annotations

import torch

from bayeskd.config import load_config
from bayeskd.models import load_causal_lm


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_scratch_keeps_the_architecture_and_draws_new_weights_from_its_seed(tiny_lm):
    pretrained = _params(load_causal_lm(str(tiny_lm), init_layers=1))
    scratch = _params(load_causal_lm(str(tiny_lm), init_layers=1, scratch_seed=3))
    again = _params(load_causal_lm(str(tiny_lm), init_layers=1, scratch_seed=3))
    other = _params(load_causal_lm(str(tiny_lm), init_layers=1, scratch_seed=4))
    assert scratch.keys() == pretrained.keys()
    assert all(scratch[k].shape == pretrained[k].shape for k in scratch)
    assert not any(k.startswith("model.layers.1.") for k in scratch)  # init_layers applies to both
    weights = [k for k in scratch if not k.endswith("inv_freq") and "norm" not in k]  # norms start at ones either way
    assert weights and all(not torch.equal(scratch[k], pretrained[k]) for k in weights)
    assert all(torch.equal(scratch[k], again[k]) for k in scratch)
    assert any(not torch.equal(scratch[k], other[k]) for k in weights)


def test_scratch_does_not_disturb_the_global_random_state(tiny_lm):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_causal_lm(str(tiny_lm), scratch_seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_init_enters_the_fingerprint_only_when_it_is_not_the_default():
    base = load_config(None).distill.train
    assert "init" not in base.identity()
    scratch = load_config(None, ["distill.train.init=scratch"]).distill.train
    assert scratch.identity() == {**base.identity(), "init": "scratch"}


def test_cache_root_is_the_env_then_the_checkouts_cache_then_home(tmp_path, monkeypatch):
    from pathlib import Path

    from bayeskd.models import cache_root

    monkeypatch.delenv("BAYESKD_CACHE", raising=False)
    home = Path.home() / ".cache" / "bayeskd"
    assert cache_root(tmp_path) == home  # not a checkout
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert cache_root(tmp_path) == home  # a checkout with no cache yet: nothing to reuse
    (tmp_path / ".cache" / "bayeskd").mkdir(parents=True)
    assert cache_root(tmp_path) == tmp_path / ".cache" / "bayeskd"  # what `make demo` filled
    monkeypatch.setenv("BAYESKD_CACHE", str(tmp_path / "mine"))
    assert cache_root(tmp_path) == tmp_path / "mine"
