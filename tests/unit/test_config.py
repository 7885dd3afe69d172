from pathlib import Path

import pytest

from bayeskd.cli import main
from bayeskd.config import Config, dump_yaml, load_config, parse_override
from bayeskd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.teacher.model == "smollm2-135m-instruct"
    assert cfg.serve.host == "127.0.0.1"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    # Round trip: the resolved config saved in a run folder loads back to the same values.
    tmp = path.parent / f".roundtrip-{path.name}"
    try:
        tmp.write_text(dump_yaml(cfg))
        assert load_config(tmp) == cfg
    finally:
        tmp.unlink(missing_ok=True)


def test_shipped_configs_exist():
    assert (ROOT / "configs" / "quickstart.yaml").is_file()


@pytest.mark.parametrize("section, how, what", [("data", "num_proc=4", "max_length=64"),
                                               ("prior", "num_workers=4", "mu=5"),
                                               ("prior", "shard_tokens=10000", "top_k=8")])
def test_process_counts_are_not_part_of_stage_fingerprints(section, how, what):
    """Settings that change how a stage computes (processes, shard sizes) leave its identity,
    hence the fingerprints, alone; settings that change what it computes do not."""
    base = getattr(load_config(None), section).identity()
    assert getattr(load_config(None, [f"{section}.{how}"]), section).identity() == base
    assert getattr(load_config(None, [f"{section}.{what}"]), section).identity() != base


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["collect.max_tokens=64", 'collect.stop=["\\n\\n", END]', "teacher.base_url=null", "collect.price.prompt_per_1k=0.5"])
    assert cfg.collect.max_tokens == 64
    assert cfg.collect.stop == ["\n\n", "END"]
    assert cfg.teacher.base_url is None
    assert cfg.collect.price.prompt_per_1k == 0.5
    assert parse_override("a.b=") == ("a.b", "")
    assert load_config(None, ["proxy.train.lr=1e-3"]).proxy.train.lr == 0.001  # YAML 1.1 reads it as a string


@pytest.mark.parametrize(
    "override, message",
    [
        ("collect.max_tokens=abc", "collect.max_tokens='abc': expected an integer"),
        ("collect.max_tokens=0", "collect.max_tokens=0: must be >= 1"),
        ("collect.bogus=1", "unknown key collect.bogus"),
        ("bogus.x=1", "unknown key bogus"),
        ("collect.top_logprobs=21", "collect.top_logprobs=21: must be in 0..20"),
        ("teacher.backend=grpc", "teacher.backend='grpc': must be one of 'local', 'openai'"),
        ("collect.temperature=true", "collect.temperature=True: expected a number"),
        ("collect.stop=3", "collect.stop=3: expected a list"),
        ("collect.price=7", "collect.price=7: expected a mapping"),
        ("collect.max_tokens", "expected key=value"),
        ("collect.max_tokens.x=1", "collect.max_tokens={'x': 1}: expected an integer"),
        ("serve.faults.drop=1.5", "serve.faults.drop=1.5: must be in [0, 1]"),
        ("serve.faults.slow=-0.1", "serve.faults.slow=-0.1: must be in [0, 1]"),
        ("serve.faults.slow_s=0", "serve.faults.slow_s=0.0: must be > 0"),
        ("serve.faults.bogus=1", "unknown key serve.faults.bogus"),
        ("data.num_proc=0", "data.num_proc=0: must be >= 1"),
        ("distill.train.init=random", "distill.train.init='random': must be one of 'pretrained', 'scratch'"),
        ("distill.alpha=0.5", "distill.alpha: replaced by kd_weight and prior_share"),
        ("distill.beta=1", "distill.beta: replaced by kd_weight"),
        ("distill.prior_share=1.5", "distill.prior_share=1.5: must be in [0, 1]"),
        ("distill.fit_tau=[0]", "distill.fit_tau=[0.0]: must be values > 0"),
        ("distill.train.select=best_validation", "distill.train.eval_every=0: must be > 0 with select: best_validation"),
        ("posterior.mode=sampled", None),
        ("teacher.logprobs_are=sampled", "teacher.logprobs_are='sampled': the local teacher reports raw logprobs"),
        ("collect.mode=batch", "collect.mode='batch': a Batch API is reached through an OpenAI-compatible endpoint"),
        ("collect.mode=bulk", "collect.mode='bulk': must be one of 'online', 'batch'"),
        ("collect.price.batch_discount=2", "collect.price.batch_discount=2.0: must be in [0, 1]"),
        ("collect.batch_poll_s=0", "collect.batch_poll_s=0.0: must be > 0"),
    ],
)
def test_bad_values_name_the_field(override, message):
    if message is None:  # a valid value among the bad ones
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_every_kd_mode_has_the_same_total_kd_weight():
    """Equal footing: CE + kd_weight * (KL terms), whatever the mode; bayes splits it by prior_share."""
    from bayeskd.stages.distill import loss_weights

    cfg = load_config(None, ["distill.kd_weight=1.5"])
    d = cfg.distill
    shares = {"bayes": {"prior": d.prior_share, "target": 1 - d.prior_share}, "prior-only": {"prior": 1.0},
              "posterior-only": {"target": 1.0}, "proxy-kd": {"target": 1.0}, "topk-kd": {"target": 1.0}}  # fmt: skip
    for mode, share in shares.items():
        w = loss_weights(d.lambda_ce, share, d.kd_weight)
        assert w["lambda_ce"] == 1.0 and w.get("alpha", 0) + w.get("beta", 0) == pytest.approx(1.5), mode
    assert loss_weights(1.0, shares["bayes"], 1.5) == pytest.approx({"lambda_ce": 1.0, "alpha": 0.5, "beta": 1.0})
    # A sampled posterior may be the proxy alone: infinitely many draws.
    assert load_config(None, ["posterior.mode=sampled", "posterior.m=.inf"]).posterior.m == float("inf")


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("collect: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_bad_config_exits_2(tmp_path, capsys):
    assert main(["collect", f"run_dir={tmp_path}", "collect.n=-1"]) == 2
    err = capsys.readouterr().err
    assert "collect.n=-1: must be >= 1" in err
    assert "Traceback" not in err
    assert not (tmp_path / "collect").exists()
    assert main(["collect", "--config", str(tmp_path / "nope.yaml")]) == 2


def test_cli_prints_resolved_config(capsys):
    assert main(["config", "collect.n=3"]) == 0
    out = capsys.readouterr().out
    assert "n: 3" in out


def test_a_partial_section_keeps_the_fields_own_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("proxy:\n  train:\n    max_steps: 7\n")
    cfg = load_config(path)
    assert cfg.proxy.train.max_steps == 7
    assert cfg.proxy.train.init_layers == 10  # ProxyConfig's default, not TrainConfig's
    assert load_config(None, ["distill.train.lr=0.1"]).distill.train.init_layers == 4


@pytest.mark.parametrize("override, message", [
    ("proxy.align=dpo", "proxy.align='dpo': must be one of 'sft', 'sft+dpo'"),
    ("proxy.dpo.beta=0", "proxy.dpo.beta=0.0: must be > 0"),
    ("proxy.dpo.samples=0", "proxy.dpo.samples=0: must be >= 1"),
    ("proxy.dpo.temperature=0", "proxy.dpo.temperature=0.0: must be > 0"),
    ("proxy.dpo.max_new_tokens=0", "proxy.dpo.max_new_tokens=0: must be >= 1 or null"),
])
def test_bad_dpo_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_dpo_trains_the_sft_proxy_with_its_own_steps_and_rate():
    cfg = load_config(None, ["proxy.train.lora.enabled=true", "proxy.dpo.lr=1e-5", "proxy.dpo.max_steps=7"])
    t = cfg.proxy.dpo.train_config(cfg.proxy.train, "runs/x/proxy/final")
    assert (t.model, t.init_layers, t.lr, t.max_steps, t.batch_size) == ("runs/x/proxy/final", None, 1e-5, 7, 4)
    assert t.lora.enabled and t.max_grad_norm == cfg.proxy.train.max_grad_norm  # the rest is proxy.train's
