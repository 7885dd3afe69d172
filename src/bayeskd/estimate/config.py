"""Options of the estimate: the n-gram `prior`, the `posterior` update and the `probe` stage.
Loaded by `bayeskd.config`; imports nothing of bayeskd but errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from bayeskd.errors import check


@dataclass
class PriorConfig:
    """Stage `prior`: hierarchical Dirichlet n-gram counts over the responses (method.md, section 1)."""

    order: int = 3
    """n: contexts of n-1 tokens."""
    mu: float = 2.0
    """Dirichlet strength of each back-off level; kappa = N(h) + mu."""
    top_k: int = 32
    """Prior candidates per position handed to the posterior."""
    leave_one_out: bool = True
    """At the corpus's own positions, remove the position's own occurrence from the counts."""
    smoothing: Literal["dirichlet"] = "dirichlet"
    """The hierarchical Dirichlet smoother of method.md (interpolated Kneser-Ney is not implemented yet)."""
    shard_tokens: int = 4_000_000
    """Tokens counted per shard (bounds memory; shards are merged exactly)."""
    num_workers: int = 1
    """Processes counting shards in parallel."""

    def identity(self) -> dict:
        """The fields that decide the prior's values (all but `shard_tokens` and `num_workers`,
        which change how the tables are counted, not what they hold): what stage fingerprints
        include."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("shard_tokens", "num_workers")}

    def validate(self, path: str) -> None:
        check(1 <= self.order <= 8, f"{path}.order", self.order, "must be in 1..8")
        check(self.mu > 0, f"{path}.mu", self.mu, "must be > 0")
        check(self.top_k >= 1, f"{path}.top_k", self.top_k, "must be >= 1")
        check(self.shard_tokens >= 1000, f"{path}.shard_tokens", self.shard_tokens, "must be >= 1000")
        check(self.num_workers >= 1, f"{path}.num_workers", self.num_workers, "must be >= 1")


@dataclass
class PosteriorConfig:
    """Stage `posterior`: update the prior with the proxy's evidence, per response token (method.md, section 2)."""

    mode: Literal["expected", "sampled", "product"] = "expected"
    """`expected`: (kappa p_prior + M p_P) / (kappa + M); `sampled`: M draws from the proxy as counts; `product`: p_prior^a p_P^b."""
    m: float = 8.0
    """M, the proxy's strength in pseudo-observations (an integer number of draws for `sampled`);
    `.inf`: the proxy alone (the prior and the teacher's probe samples then weigh nothing)."""
    proxy_temperature: float = 1.0
    """tau_P: the proxy's distribution is softmax(z / tau_P)."""
    top_k: int = 32
    """K: entries stored per token (candidates are the union of the prior's and the proxy's top-K)."""
    a: float = 1.0
    """`product`: exponent of the prior."""
    b: float = 1.0
    """`product`: exponent of the proxy."""
    use_logprobs: bool = True
    """Let the teacher's top-k logprobs, where collect stored them, fix those tokens' probabilities."""
    top_logprobs: int | None = None
    """The most of the API's alternatives per token the method reads (the posterior's evidence and
    `topk-kd`'s targets): as an API that returns fewer would. Null: all that collect stored; 0: none."""
    batch_size: int = 8
    """Examples per proxy forward pass."""
    seed: int = 0
    """Seed of `sampled`'s draws."""
    fit: Literal["none", "auto"] = "none"
    """`auto`: choose prior.order, prior.mu, M and tau_P by the black-box NLL of the teacher's own
    tokens on the validation split (needs data.validation_fraction > 0; no oracle), over the grids
    below, and record the choice in the posterior's manifest; later stages use it. `none`: the values as set."""
    fit_orders: list[int] | None = None
    """`auto`: the prior orders tried (null: 1 .. prior.order, the tables' order)."""
    fit_mu: list[float] = field(default_factory=lambda: [0.5, 2.0, 8.0, 32.0])
    """`auto`: the prior's mu values tried."""
    fit_m: list[float] = field(default_factory=lambda: [0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0])
    """`auto`: the proxy strengths M tried (0: the prior alone; .inf: the proxy alone)."""
    fit_proxy_temperature: list[float] = field(default_factory=lambda: [0.8, 1.0, 1.25])
    """`auto`: the proxy temperatures tau_P tried."""
    fit_positions: int = 4000
    """`auto`: most validation positions scored."""
    proxy_backend: Literal["local", "openai"] = "local"
    """Where the proxy's distributions come from. `local`: the run's `proxy` stage checkpoint, run
    here (dense logits). `openai`: a completions endpoint that echoes the prompt's logprobs (vLLM,
    `bayeskd serve`): each example's text, rendered as the local path renders it, is sent with
    `echo: true`, `logprobs: proxy_top_logprobs` and `max_tokens: 0`, and the proxy's top-k at
    each response token is read from `choices[0].logprobs.top_logprobs`; its unlisted mass is its
    tail. The served model must have the student's tokenizer (checked token by token)."""
    proxy_base_url: str | None = None
    """`openai`: the endpoint's base URL, e.g. http://host:8000/v1."""
    proxy_model: str | None = None
    """`openai`: the model name the endpoint serves the proxy under."""
    proxy_api_key_env: str | None = None
    """`openai`: the environment variable holding the endpoint's key (null: none needed)."""
    proxy_top_logprobs: int = 20
    """`openai`: the proxy's alternatives asked for per token (vLLM's --max-logprobs is 20 by default)."""
    proxy_concurrency: int = 8
    """`openai`: requests in flight at once (one example each)."""
    proxy_timeout_s: float = 300.0
    """`openai`: seconds one request may take."""

    def identity(self) -> dict:
        """The fields the posterior's values depend on (what its stage fingerprint holds): the served
        proxy's settings only when it is used (so that runs made before they existed stay current), and
        never where its key lives or how many requests run at once."""
        out = dataclasses.asdict(self)
        for name in ("proxy_api_key_env", "proxy_concurrency", "proxy_timeout_s"):
            out.pop(name)
        if self.proxy_backend == "local":
            for name in ("proxy_backend", "proxy_base_url", "proxy_model", "proxy_top_logprobs"):
                out.pop(name)
        return out

    def validate(self, path: str) -> None:
        if self.proxy_backend == "openai":
            for name in ("proxy_base_url", "proxy_model"):
                check(bool(getattr(self, name)), f"{path}.{name}", getattr(self, name), "must be set with proxy_backend openai")
            check(self.proxy_temperature == 1.0, f"{path}.proxy_temperature", self.proxy_temperature,
                  "must be 1 with proxy_backend openai (the served proxy's values beyond its top-k are unknown)")  # fmt: skip
            check(self.fit == "none", f"{path}.fit", self.fit, "must be none with proxy_backend openai (the fit needs the dense proxy)")
        check(1 <= self.proxy_top_logprobs <= 20, f"{path}.proxy_top_logprobs", self.proxy_top_logprobs, "must be in 1..20")
        check(self.proxy_concurrency >= 1, f"{path}.proxy_concurrency", self.proxy_concurrency, "must be >= 1")
        check(self.proxy_timeout_s > 0, f"{path}.proxy_timeout_s", self.proxy_timeout_s, "must be > 0")
        check(self.m >= 0, f"{path}.m", self.m, "must be >= 0")
        check(all(m >= 0 for m in self.fit_m) and self.fit_m, f"{path}.fit_m", self.fit_m, "must be values >= 0")
        check(self.mode != "sampled" or all(float(m).is_integer() or m == float("inf") for m in self.fit_m),
               f"{path}.fit_m", self.fit_m, "must be whole numbers of draws for mode sampled")  # fmt: skip
        check(all(v > 0 for v in self.fit_mu) and self.fit_mu, f"{path}.fit_mu", self.fit_mu, "must be values > 0")
        check(all(v > 0 for v in self.fit_proxy_temperature) and self.fit_proxy_temperature,
               f"{path}.fit_proxy_temperature", self.fit_proxy_temperature, "must be values > 0")  # fmt: skip
        check(self.fit_orders is None or all(o >= 1 for o in self.fit_orders), f"{path}.fit_orders",
               self.fit_orders, "must be orders >= 1 or null")  # fmt: skip
        check(self.fit_positions >= 1, f"{path}.fit_positions", self.fit_positions, "must be >= 1")
        check(self.mode != "sampled" or float(self.m).is_integer() or self.m == float("inf"), f"{path}.m", self.m,
               "must be a whole number of draws (or .inf) for mode sampled")  # fmt: skip
        check(self.proxy_temperature > 0, f"{path}.proxy_temperature", self.proxy_temperature, "must be > 0")
        check(self.top_k >= 1, f"{path}.top_k", self.top_k, "must be >= 1")
        check(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, "must be >= 1")
        top = self.top_logprobs
        check(top is None or 0 <= top <= 20, f"{path}.top_logprobs", top, "must be in 0..20 or null")


@dataclass
class ProbeConfig:
    """Stage `probe`: the teacher's own next-token samples at response prefixes, where they pay (method.md, section 2).

    Off unless `budget_tokens` is set. Each query asks the teacher to continue a training
    response's prefix (x, y_<t) `samples` times; the first student token of each continuation
    is a count c_T, and the posterior there becomes (kappa p_prior + M p_P + c_T) / (kappa + M + n_T).
    """

    budget_tokens: int | None = None
    """API tokens (prompt + completion) this stage may spend; null: the stage is off."""
    strategy: Literal["active", "random", "whole"] = "active"
    """`active`: the positions whose posterior variance one query reduces most per API token;
    `random`: positions drawn uniformly (the baseline); `whole`: more whole responses to the
    training prompts, counted at every corpus prefix they share (also the fallback for a
    teacher that cannot continue a prefix)."""
    samples: int = 16
    """Samples per query (the request's `n`): the prompt is paid once for all of them."""
    max_tokens: int = 1
    """Tokens per prefix sample. 1: the continuation's first student token is counted, exact when
    teacher and student share a tokenizer. More (use about 4 when they do not): the teacher is asked
    from the start of the position's word (so that the prefix does not end inside one of its
    tokens), samples that do not rewrite the realised text up to the position are left out, and the
    student token there is counted only once the continuation has run past its word or ended the
    turn (the summary's `samples_not_counted` are the others)."""
    round_size: int = 32
    """Queries per round; the acquisition scores are recomputed between rounds."""
    max_queries_per_position: int = 4
    """`active`: the most queries at one position."""
    seed: int = 0
    """Order of `random`'s positions and of `whole`'s prompts, and the teacher's sampling seeds."""

    def validate(self, path: str) -> None:
        check(self.budget_tokens is None or self.budget_tokens > 0, f"{path}.budget_tokens", self.budget_tokens, "must be > 0 or null")
        for name in ("samples", "max_tokens", "round_size", "max_queries_per_position"):
            check(getattr(self, name) >= 1, f"{path}.{name}", getattr(self, name), "must be >= 1")
