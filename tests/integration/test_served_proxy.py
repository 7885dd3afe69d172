"""The proxy behind an OpenAI-compatible server (`posterior.proxy_backend: openai`), over real HTTP.

The run's own proxy checkpoint is served by `bayeskd serve` (in-process, loopback); the posterior
stage reads its prompt logprobs (`echo`), and its targets must equal those of the local proxy
wherever both define them: the served proxy lists only its top-k, the rest is its tail."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bayeskd.cli import main
from bayeskd.estimate.targets import TargetStore
from bayeskd.models import build_tiny
from bayeskd.teachers.config import ServeConfig



def tiny_args(run_dir, model) -> list[str]:
    """test_pipeline's tiny run: 24 responses of 8 tokens with the teacher's top-3, 4-step trainings."""
    train = "max_steps=4,batch_size=4,save_every=2,warmup_steps=1,lr=0.01,init_layers=null"
    args = [f"run_dir={run_dir}", f"teacher.model={model}", "collect.limit=24", "collect.max_tokens=8",
            "collect.top_logprobs=3", "data.heldout_fraction=0.2", "prior.order=3"]  # fmt: skip
    for section in ("proxy", "distill"):
        args.append(f"{section}.train.model={model}")
        args += [f"{section}.train.{kv}" for kv in train.split(",")]
    return args


def manifest(run_dir, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def serve_as_proxy(model_dir):
    """`bayeskd serve`'s server for `model_dir`, under the name "proxy" (as `serve.model_name` names it)."""
    from bayeskd.teachers.local import LocalTeacher
    from bayeskd.teachers.hosting import BackgroundServer

    return BackgroundServer(LocalTeacher(str(model_dir), batch_size=8), ServeConfig(port=0), served_name="proxy")


def served_args(base_url: str) -> list[str]:
    return ["posterior.proxy_backend=openai", f"posterior.proxy_base_url={base_url}", "posterior.proxy_model=proxy",
            "posterior.proxy_concurrency=3"]  # fmt: skip


@pytest.fixture(scope="module")
def local_run(tiny_teacher_dir, tmp_path_factory, one_torch_thread):
    """A run with every stage up to the posterior done with the local proxy, and the local posterior
    kept aside, with the teacher's logprobs and without them."""
    run = tmp_path_factory.mktemp("served-proxy")
    args = [*tiny_args(run, tiny_teacher_dir), "posterior.top_k=8", "prior.top_k=8"]
    for stage in ("collect", "prior", "proxy", "posterior"):
        assert main([stage, *args]) == 0, stage
    kept = {"logprobs": run.parent / f"{run.name}-local", "no-logprobs": run.parent / f"{run.name}-local-no-logprobs"}
    shutil.copytree(run / "posterior", kept["logprobs"])
    assert main(["posterior", *args, "posterior.use_logprobs=false", "--force"]) == 0
    shutil.copytree(run / "posterior", kept["no-logprobs"])
    return run, args, kept


def differences(local, served) -> tuple[np.ndarray, np.ndarray]:
    """|local - served| of the stored posterior on the tokens both stored and the served proxy listed
    (its stored top-8 of the 20 it was asked for), and of the proxy's top-8 where both have the token."""
    a, b = TargetStore.open(local / "targets"), TargetStore.open(served / "targets")
    post, proxy = [], []
    assert set(a._index) == set(b._index) and a._index
    for i in sorted(a._index):
        pa_ids, pb_ids = a.rows(i, "proxy_ids"), b.rows(i, "proxy_ids")
        assert (pa_ids == pb_ids).mean() > 0.95  # the same top tokens (ties aside)
        same = pa_ids == pb_ids
        proxy.append(np.abs(a.rows(i, "proxy_probs").astype(float) - b.rows(i, "proxy_probs").astype(float))[same])
        la, lb = a.rows(i, "posterior_ids"), b.rows(i, "posterior_ids")
        va, vb = a.rows(i, "posterior_probs").astype(float), b.rows(i, "posterior_probs").astype(float)
        for t in range(len(la)):
            da = {int(x): v for x, v in zip(la[t], va[t]) if x >= 0}
            db = {int(x): v for x, v in zip(lb[t], vb[t]) if x >= 0}
            post += [abs(da[k] - db[k]) for k in set(da) & set(db) & set(pb_ids[t].tolist())]
    return np.array(post), np.concatenate(proxy)


def test_served_proxy_posterior_equals_the_local_one(local_run, capsys):
    run, args, kept = local_run
    with serve_as_proxy(run / "proxy" / "final") as s:
        # A stage config that changed (the proxy's backend) is stale without --force, as any other.
        assert main(["posterior", *args, *served_args(s.base_url)]) == 2
        assert main(["posterior", *args, *served_args(s.base_url), "posterior.use_logprobs=false", "--force"]) == 0
        post, proxy = differences(kept["no-logprobs"], run / "posterior")
        print(f"no teacher logprobs: {len(post)} posterior entries, max abs diff {post.max():.2e}; "
              f"proxy top-8 max abs diff {proxy.max():.2e}")  # fmt: skip
        # Prior and proxy alone: exact on every token the served proxy listed (float16 as stored).
        assert len(post) > 100 and post.max() < 1e-6 and proxy.max() < 1e-6
        assert main(["posterior", *args, *served_args(s.base_url), "--force"]) == 0
        # The students train on the served targets, end to end through the CLI.
        distill = ["distill.modes=[bayes, proxy-kd]", "distill.train.max_steps=2"]
        assert main(["distill", *args, *served_args(s.base_url), *distill]) == 0
    m = manifest(run, "posterior")
    assert m["config"]["posterior"]["proxy_backend"] == "openai" and m["inputs"]["proxy"].endswith("#proxy")
    assert "proxy_backend" not in json.loads((kept["logprobs"] / "manifest.json").read_text())["config"]["posterior"]
    served = m["summary"]["served_proxy"]
    # bayeskd serve honours return_tokens_as_token_ids: byte fragments that decode alike stay apart.
    assert served["positions"] == m["summary"]["positions"] and served["unreadable_alternatives"] == 0
    # Proxy-KD's weights: the realised token's logprob is exact in the echo.
    local_ll = np.load(kept["logprobs"] / "proxy_loglik.npy")
    np.testing.assert_allclose(np.load(run / "posterior" / "proxy_loglik.npy"), local_ll, atol=1e-4)
    # With the teacher's logprobs, the mass they leave is spread in proportion to the posterior,
    # which differs where a teacher token is outside the served proxy's top-20 (there the served
    # proxy gives it nothing): a small difference on the others.
    post, _ = differences(kept["logprobs"], run / "posterior")
    print(f"with teacher logprobs: {len(post)} posterior entries, max abs diff {post.max():.2e}, mean {post.mean():.2e}")
    assert len(post) > 100 and post.max() < 5e-3 and post.mean() < 5e-4


def test_a_served_proxy_with_another_tokenizer_is_refused(local_run, tmp_path, capsys):
    run, args, _ = local_run
    other = build_tiny(tmp_path / "other", ["a completely different corpus of words"] * 20, vocab_size=280)
    with serve_as_proxy(other) as s:
        capsys.readouterr()
        assert main(["posterior", *args, *served_args(s.base_url), "--force"]) == 2
    err = capsys.readouterr().err
    assert s.base_url in err and "tokenizer is not the student's" in err


def test_an_unreachable_or_unset_proxy_endpoint_is_a_clear_error(local_run, capsys):
    run, args, _ = local_run
    capsys.readouterr()
    assert main(["posterior", *args, "posterior.proxy_backend=openai", "--force"]) == 2
    assert "posterior.proxy_base_url" in capsys.readouterr().err
    dead = "http://127.0.0.1:9/v1"
    assert main(["posterior", *args, *served_args(dead), "--force"]) == 2
    err = capsys.readouterr().err
    assert dead in err and "unreachable" in err
