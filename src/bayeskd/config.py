"""Typed configuration: one dataclass per stage, loaded from YAML plus dotted overrides.

This module is the only home of defaults and of the help text for every option.
A YAML file holds only the values that differ from the defaults; on the command line,
``collect.max_tokens=64`` overrides one field (the value is parsed as YAML, so
``'collect.stop=["\\n\\n"]'`` and ``teacher.base_url=null`` work too).

Every error names the offending field by its dotted path and shows the bad value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bayeskd.errors import BayeskdError


class ConfigError(BayeskdError, ValueError):
    """A config value, key or file is invalid. The message names the field."""


def _check(cond: bool, path: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{path}={value!r}: {why}")


def _fields_except(section: Any, *names: str) -> dict:
    """A config section as a dict without the fields that change how a stage computes, not what
    (process counts, shard sizes): what stage fingerprints include."""
    return {k: v for k, v in dataclasses.asdict(section).items() if k not in names}


REQUEST_FIELDS = frozenset({
    "model", "messages", "prompt", "n", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed",
    "stop", "logprobs", "top_logprobs", "continue_final_message", "add_generation_prompt",
})  # fmt: skip
"""The request fields bayeskd sets itself: `teacher.extra_body` may not override them."""


@dataclass
class TeacherConfig:
    """The black-box teacher. Only text and top-k logprobs ever come back from it."""

    backend: Literal["local", "openai"] = "local"
    """`local`: a Hugging Face model in this process; `openai`: any OpenAI-compatible endpoint."""
    model: str = "smollm2-135m-instruct"
    """local: `smollm2-135m-instruct` (the embedded default), a model folder or a hub id; openai: the served model name."""
    name: str | None = None
    """Name that keys the response store and the ledger. Unset, the key is `local:<model>` or
    `openai:<base_url>:<model>:<endpoint>`, so that a server moved to another address (a new
    port) looks like another teacher and every answer is paid for again. Naming the teacher says
    it is the same model wherever it is served: its stored answers are replayed, and `collect`
    done at one address stays done at another. Change the name when the model changes."""
    base_url: str | None = None
    """openai: the endpoint, e.g. http://127.0.0.1:8000/v1 (OpenAI itself when unset)."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: the environment variable that holds the API key. The key itself never appears in any config or file."""
    endpoint: Literal["chat", "completions"] = "chat"
    """openai: `/chat/completions` with messages, or `/completions` with the chat-formatted prompt as text."""
    completion_template: str = "chatml"
    """openai + completions: how chat messages become the prompt text: `chatml` or a Jinja chat template."""
    prefix_via: Literal["auto", "completions", "continue_final_message", "none"] = "auto"
    """openai: how the teacher continues a response prefix (stage `probe`): `completions` (the raw
    endpoint, with the messages formatted by `completion_template`, then the prefix),
    `continue_final_message` (a chat request ending in the assistant's prefix: vLLM,
    `bayeskd serve`), or `none`. `auto`: `completions` when `base_url` is set, else `none`
    (OpenAI's own API). A local teacher always can."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """openai: fields added to every chat and completions request's JSON body, for parameters a
    server has beyond OpenAI's (the SDK's `extra_body`). A server may truncate the distribution it
    samples from by defaults of its own; then the corpus is not drawn from the distribution the
    logprobs describe. llama.cpp's server samples with top_k 40, min_p 0.05 and repeat_penalty
    1.1 unless told otherwise: send `{top_k: 0, min_p: 0, repeat_penalty: 1.0}` there (vLLM's
    defaults truncate nothing). Fields bayeskd sets itself (n, temperature, top_p, max_tokens,
    seed, stop, logprobs, ...) are refused here: set them where their option lives."""
    max_concurrency: int = 8
    """openai: requests in flight at once."""
    timeout_s: float = 120.0
    """openai: per-request timeout in seconds."""
    max_retries: int = 6
    """openai: attempts after the first for retryable failures (429, 5xx, timeouts, dropped connections)."""
    backoff_s: float = 1.0
    """openai: first backoff delay; doubles per attempt (with jitter) unless the server sends Retry-After."""
    down_after: int = 5
    """openai: refused connections in a row (no answer of any kind between them, across all requests
    in flight) after which the endpoint is taken as down: the stage stops with a message naming it,
    keeps every answer already paid for, and a rerun asks only for the rest. Timeouts do not count
    (a slow server is up). 0: never stop, retry each request `max_retries` times as before."""
    logprobs_are: Literal["raw", "sampled"] = "raw"
    """Which distribution the API's top-k logprobs describe: `raw`, the model's softmax(z) before
    temperature and top-p (vLLM's default, `bayeskd serve`, the local teacher), or `sampled`, the
    distribution `collect` sampled from (after collect.temperature and collect.top_p). The estimate
    targets the sampled one: `raw` logprobs are converted to it (`distributions.to_sampling`);
    with collect.temperature 1 and top_p 1 the two are the same."""
    device: str = "cpu"
    """local: torch device."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """local: weights' dtype."""
    batch_size: int = 128
    """local: rows (one per sample) decoded together by continuous batching; finished rows are
    refilled from waiting requests. Larger batches use the CPU's matrix units better (on 2 cores
    with SmolLM2-135M, bench/generate.py measured tokens/s rising from 16 to 128 rows), at the
    price of a KV cache of batch_size x (longest prompt + max_tokens) positions: 1.5 GB for this
    model at max_tokens 128; lower it for a larger teacher."""

    def validate(self, path: str) -> None:
        _check(self.max_concurrency >= 1, f"{path}.max_concurrency", self.max_concurrency, "must be >= 1")
        _check(self.timeout_s > 0, f"{path}.timeout_s", self.timeout_s, "must be > 0")
        _check(self.max_retries >= 0, f"{path}.max_retries", self.max_retries, "must be >= 0")
        _check(self.down_after >= 0, f"{path}.down_after", self.down_after, "must be >= 0")
        _check(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, "must be >= 1")
        _check(bool(self.model), f"{path}.model", self.model, "must name a model")
        for key in self.extra_body:
            _check(key not in REQUEST_FIELDS, f"{path}.extra_body.{key}", self.extra_body[key],
                   "bayeskd sets this field itself (from collect.* and probe.*); extra_body is for the server's own")  # fmt: skip
        _check(self.backend != "local" or self.logprobs_are == "raw", f"{path}.logprobs_are", self.logprobs_are,
               "the local teacher reports raw logprobs (before temperature and top-p): must be `raw`")  # fmt: skip

    @property
    def key_name(self) -> str:
        """Who answered: keys the response store, so that no two teachers' answers mix."""
        if self.name:
            return self.name
        if self.backend == "local":
            return f"local:{self.model}"
        return f"openai:{self.base_url or 'api.openai.com'}:{self.model}:{self.endpoint}"


@dataclass
class PriceConfig:
    """Price of teacher tokens, in any currency unit, per 1000 tokens."""

    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0

    def validate(self, path: str) -> None:
        _check(self.prompt_per_1k >= 0, f"{path}.prompt_per_1k", self.prompt_per_1k, "must be >= 0")
        _check(self.completion_per_1k >= 0, f"{path}.completion_per_1k", self.completion_per_1k, "must be >= 0")


@dataclass
class CollectConfig:
    """Stage `collect`: the teacher's responses to prompts, through its API."""

    prompts: str = "builtin"
    """`builtin` (the shipped prompt set), a .jsonl file, a .txt file (one prompt a line) or a `datasets` folder saved with save_to_disk."""
    prompt_field: str = "prompt"
    """Field holding the prompt text in JSONL / datasets input (a `messages` field, if present, is used as chat messages)."""
    limit: int | None = None
    """Use only the first `limit` prompts (after shuffling, if `shuffle`)."""
    shuffle: bool = False
    """Shuffle prompts with the run's seed before `limit`."""
    system_prompt: str | None = None
    """Optional system message put before every prompt."""
    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    """Most tokens per response."""
    seed: int | None = 0
    """Sampling seed sent to the teacher (offset per prompt); null for none."""
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0
    """Top-k alternatives per generated token to ask for (0..20); 0 asks for none."""
    budget_tokens: int | None = None
    """Stop dispatching new requests once prompt + completion tokens would pass this."""
    budget_cost: float | None = None
    """Stop dispatching once the cost (from `price`) would pass this."""
    price: PriceConfig = field(default_factory=PriceConfig)
    flush_every: int = 16
    """Records written between fsyncs of the store."""
    teacher_check: bool = True
    """openai: run `bayeskd teacher-check` once before the first paid request (20 to 70 short
    requests: 22 and 781 tokens against llama.cpp serving SmolLM2; counted in the ledger). A row that would break
    the run (no logprobs where they are asked for, server-side truncation of the sampling, ...)
    stops the stage before it pays for anything; the table is kept in `collect/teacher_check.json`."""

    def validate(self, path: str) -> None:
        _check(self.n >= 1, f"{path}.n", self.n, "must be >= 1")
        _check(self.max_tokens >= 1, f"{path}.max_tokens", self.max_tokens, "must be >= 1")
        _check(0 <= self.top_logprobs <= 20, f"{path}.top_logprobs", self.top_logprobs, "must be in 0..20")
        _check(self.temperature >= 0, f"{path}.temperature", self.temperature, "must be >= 0")
        _check(0 < self.top_p <= 1, f"{path}.top_p", self.top_p, "must be in (0, 1]")
        _check(self.limit is None or self.limit >= 1, f"{path}.limit", self.limit, "must be >= 1 or null")
        _check(self.flush_every >= 1, f"{path}.flush_every", self.flush_every, "must be >= 1")
        for name in ("budget_tokens", "budget_cost"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"{path}.{name}", v, "must be > 0 or null")
        self.price.validate(f"{path}.price")


@dataclass
class LoraConfig:
    """LoRA adapters through `peft` (off by default: full fine-tuning)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self, path: str) -> None:
        _check(self.r >= 1, f"{path}.r", self.r, "must be >= 1")
        _check(0 <= self.dropout < 1, f"{path}.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class TrainConfig:
    """The one training loop (accelerate), shared by `proxy` and `distill`."""

    model: str = "smollm2-135m-instruct"
    """Model to train: the embedded name, a folder, or a hub id (any AutoModelForCausalLM)."""
    init_layers: int | None = None
    """Keep only the first N transformer layers of `model` (a smaller model initialised from a larger one)."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """`pretrained`: start from `model`'s weights; `scratch`: `model`'s architecture (after
    `init_layers`) and tokenizer with random weights drawn from `seed`, for a student or proxy
    that owes nothing to the model it is cut from (e.g. the teacher)."""
    batch_size: int = 8
    """Examples per device per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step. Global batch = batch_size * grad_accum * processes."""
    max_steps: int = 100
    """Optimizer steps."""
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 turns it off."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`auto`: bf16 where the device supports it, else full precision."""
    eval_every: int = 0
    """Evaluate on held-out examples every N steps (0: only at the end); with `select:
    best_validation`, also how often the validation split is scored."""
    select: Literal["last", "best_validation"] = "last"
    """Which model becomes `final/`: the `last` step's, or (`best_validation`) the one with the
    lowest NLL of the teacher's tokens on the validation split (data.validation_fraction > 0),
    scored every `eval_every` steps and at the end: early stopping by a black-box criterion,
    with every model reading the same steps. The summary reports `best_step`."""
    save_every: int = 50
    """Checkpoint every N steps, for exact resume (0: only at the end)."""
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)

    def identity(self) -> dict:
        """What stage fingerprints include: every field, but `init` and `select` only when they
        are not the default, so that runs made before they existed stay valid."""
        return _fields_except(self, *(("init",) if self.init == "pretrained" else ()), *(("select",) if self.select == "last" else ()))

    def validate(self, path: str) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            _check(v >= 1, f"{path}.{name}", v, "must be >= 1")
        for name in ("warmup_steps", "eval_every", "save_every"):
            v = getattr(self, name)
            _check(v >= 0, f"{path}.{name}", v, "must be >= 0")
        _check(self.lr > 0, f"{path}.lr", self.lr, "must be > 0")
        _check(self.max_grad_norm >= 0, f"{path}.max_grad_norm", self.max_grad_norm, "must be >= 0")
        self.lora.validate(f"{path}.lora")
        _check(self.init_layers is None or self.init_layers >= 1, f"{path}.init_layers", self.init_layers, "must be >= 1 or null")
        _check(self.select == "last" or self.eval_every > 0, f"{path}.eval_every", self.eval_every,
               "must be > 0 with select: best_validation (how often the validation split is scored)")  # fmt: skip


QUIRKS = ("ignore_n", "empty_end_of_turn", "topk_plus_sampled", "special_tokens_empty", "extra_system_turn", "server_top_k")
"""`serve.quirks` that `bayeskd serve` can reproduce."""
FAULT_KINDS = ("rate_limit", "server_error", "unavailable", "drop", "slow", "malformed", "empty", "truncated")


@dataclass
class FaultConfig:
    """Fault injection in `bayeskd serve`, for reliability tests (off by default).

    Each kind's rate is the share of generation requests that get it; request number k gets
    the same fault in every run with the same seed. Faults come before the server's own
    checks, as from a flaky gateway in front of an API.
    """

    rate_limit: float = 0.0
    """429 with `Retry-After: retry_after_s`; nothing is generated."""
    server_error: float = 0.0
    """500; nothing is generated."""
    unavailable: float = 0.0
    """503; nothing is generated."""
    drop: float = 0.0
    """The connection is closed after the status line, before any body: the client sees a connection error."""
    slow: float = 0.0
    """The answer is held back `slow_s` seconds (past the client's timeout, when that is shorter)."""
    malformed: float = 0.0
    """A 200 that is no completion: its JSON cut in half, an HTML page, or JSON of the wrong shape."""
    empty: float = 0.0
    """A 200 without text: content null, no choices, or empty text with zero completion tokens."""
    truncated: float = 0.0
    """A valid answer cut short: text and logprobs halved, finish_reason `length`."""
    retry_after_s: float = 1.0
    """Retry-After sent with `rate_limit` faults."""
    slow_s: float = 30.0
    """Delay of `slow` faults."""
    seed: int = 0
    """Seeds the choice of fault per request number."""
    log: str | None = None
    """A JSONL file that gets one line per generation request: its number, endpoint, fault, status, and whether the model ran."""
    die_after: int | None = None
    """The server dies after answering this many generation requests, as a crashed server does:
    the next request's connection is dropped and the server stops listening, so that every later
    connection is refused (the process of `bayeskd serve` exits). None: never."""

    @property
    def active(self) -> bool:
        """Whether to install the injector: some rate is positive, requests are logged, or the server is to die."""
        return self.log is not None or self.die_after is not None or any(getattr(self, k) > 0 for k in FAULT_KINDS)

    def validate(self, path: str) -> None:
        for name in FAULT_KINDS:
            v = getattr(self, name)
            _check(0 <= v <= 1, f"{path}.{name}", v, "must be in [0, 1]")
        total = sum(getattr(self, k) for k in FAULT_KINDS)
        _check(total <= 1, path, {k: getattr(self, k) for k in FAULT_KINDS if getattr(self, k)}, "rates must sum to <= 1")
        _check(self.retry_after_s >= 0, f"{path}.retry_after_s", self.retry_after_s, "must be >= 0")
        _check(self.slow_s > 0, f"{path}.slow_s", self.slow_s, "must be > 0")
        _check(self.die_after is None or self.die_after >= 0, f"{path}.die_after", self.die_after, "must be >= 0")


@dataclass
class DataConfig:
    """How corpus records become token sequences: shared by every stage, so that targets line up."""

    template: Literal["chat", "plain"] = "chat"
    """`chat`: the student tokenizer's chat template; `plain`: prompt, newline, response, EOS."""
    max_length: int = 512
    """Longest tokenized example; longer ones are truncated (the response end is cut)."""
    packing: bool = False
    """Pack several examples into one row of `max_length` instead of padding each (training only)."""
    heldout_fraction: float = 0.1
    """Share of prompts (by a hash of the prompt id) held out from training, for evaluation."""
    split: Literal["hash", "prompts"] = "hash"
    """How prompts are split into train, validation and held-out: `hash`, by hashes of the prompt id
    (`heldout_fraction`, `validation_fraction`); `prompts`, as each prompt's `split` field in a
    .jsonl prompts file says (`train`, `validation` or `heldout`): a task suite's own splits."""
    validation_fraction: float = 0.0
    """Share of the other prompts (by another hash) kept out of training and out of `eval`: what
    `posterior.fit: auto` fits on. 0: no validation split."""
    train_prompts: int | None = None
    """Train on only the first N training prompts, in corpus order (null: all). The held-out
    prompts stay as they are: for learning curves over the corpus size on one evaluation set."""
    samples: int | None = None
    """Train on only the first N samples of each prompt (null: all that `collect` has); the
    held-out prompts keep all theirs."""
    num_proc: int = 1
    """Processes that tokenize the corpus (`datasets.map` in batches); 1: in this process. The
    tokens are the same either way."""

    def identity(self) -> dict:
        """The fields that decide the tokens and the split (all but `num_proc`): what stage
        fingerprints include, so that changing the process count rebuilds nothing. Without a
        validation split its field is left out, so that runs made before it existed stay valid."""
        return _fields_except(self, "num_proc", *(() if self.validation_fraction else ("validation_fraction",)),
                              *(() if self.split != "hash" else ("split",)))  # fmt: skip

    def validate(self, path: str) -> None:
        _check(self.max_length >= 8, f"{path}.max_length", self.max_length, "must be >= 8")
        _check(self.num_proc >= 1, f"{path}.num_proc", self.num_proc, "must be >= 1")
        _check(0 <= self.heldout_fraction < 1, f"{path}.heldout_fraction", self.heldout_fraction, "must be in [0, 1)")
        _check(0 <= self.validation_fraction < 1, f"{path}.validation_fraction", self.validation_fraction, "must be in [0, 1)")
        for name in ("train_prompts", "samples"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"{path}.{name}", v, "must be >= 1 or null")


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
        return _fields_except(self, "shard_tokens", "num_workers")

    def validate(self, path: str) -> None:
        _check(1 <= self.order <= 8, f"{path}.order", self.order, "must be in 1..8")
        _check(self.mu > 0, f"{path}.mu", self.mu, "must be > 0")
        _check(self.top_k >= 1, f"{path}.top_k", self.top_k, "must be >= 1")
        _check(self.shard_tokens >= 1000, f"{path}.shard_tokens", self.shard_tokens, "must be >= 1000")
        _check(self.num_workers >= 1, f"{path}.num_workers", self.num_workers, "must be >= 1")


@dataclass
class DpoConfig:
    """`proxy.align: sft+dpo`: preference optimisation of the fine-tuned proxy (Proxy-KD's second step).

    For each training prompt the SFT proxy samples `samples` responses of its own; each teacher
    response to that prompt is preferred over each of them, and DPO trains the proxy against the
    frozen SFT proxy as reference. Only the proxy generates: no API call is made. The training
    loop is `proxy.train`'s (its LoRA, precision, clipping, schedule) with the values below.
    """

    beta: float = 0.1
    """DPO's beta: the strength of the implicit KL to the reference (larger stays closer to it)."""
    samples: int = 1
    """The proxy's own responses per training prompt (the rejected side of the pairs)."""
    max_new_tokens: int | None = None
    """Most tokens per proxy response (null: collect.max_tokens, as the teacher's)."""
    temperature: float = 1.0
    """Sampling temperature of the proxy's responses."""
    seed: int = 0
    """Seeds the proxy's samples (per prompt and sample) and the order of the pairs in training."""
    max_steps: int = 30
    """Optimizer steps of DPO."""
    batch_size: int = 4
    """Pairs per micro-step (each is two sequences in the forward)."""
    lr: float = 5e-5
    warmup_steps: int = 3
    save_every: int = 10
    """Checkpoint every N steps, for exact resume (0: only at the end)."""

    def validate(self, path: str) -> None:
        _check(self.beta > 0, f"{path}.beta", self.beta, "must be > 0")
        _check(self.temperature > 0, f"{path}.temperature", self.temperature, "must be > 0 (the proxy samples)")
        _check(self.lr > 0, f"{path}.lr", self.lr, "must be > 0")
        for name in ("samples", "max_steps", "batch_size"):
            _check(getattr(self, name) >= 1, f"{path}.{name}", getattr(self, name), "must be >= 1")
        for name in ("warmup_steps", "save_every"):
            _check(getattr(self, name) >= 0, f"{path}.{name}", getattr(self, name), "must be >= 0")
        v = self.max_new_tokens
        _check(v is None or v >= 1, f"{path}.max_new_tokens", v, "must be >= 1 or null")

    def train_config(self, base: TrainConfig, model: str) -> TrainConfig:
        """The training loop's settings for DPO: `base` (proxy.train) with this section's values,
        starting from `model` (the SFT proxy) as it is."""
        return dataclasses.replace(base, model=model, init_layers=None, max_steps=self.max_steps, lr=self.lr,
                                   batch_size=self.batch_size, warmup_steps=self.warmup_steps,
                                   save_every=self.save_every, seed=self.seed, eval_every=0)  # fmt: skip


@dataclass
class ProxyConfig:
    """Stage `proxy`: align an open model to the teacher by fine-tuning it on the corpus."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(init_layers=10, max_steps=60, lr=3e-4))
    align: Literal["sft", "sft+dpo"] = "sft"
    """`sft`: fine-tuning on the teacher's responses (`proxy/final/`). `sft+dpo`: then DPO with
    the teacher's responses preferred over the proxy's own (`proxy.dpo`), in `proxy/dpo/final/`,
    which every later stage reads as the proxy; the SFT proxy stays in `proxy/final/`."""
    dpo: DpoConfig = field(default_factory=DpoConfig)
    """The DPO step of `align: sft+dpo`."""

    def validate(self, path: str) -> None:
        self.train.validate(f"{path}.train")
        self.dpo.validate(f"{path}.dpo")


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

    def validate(self, path: str) -> None:
        _check(self.m >= 0, f"{path}.m", self.m, "must be >= 0")
        _check(all(m >= 0 for m in self.fit_m) and self.fit_m, f"{path}.fit_m", self.fit_m, "must be values >= 0")
        _check(self.mode != "sampled" or all(float(m).is_integer() or m == float("inf") for m in self.fit_m),
               f"{path}.fit_m", self.fit_m, "must be whole numbers of draws for mode sampled")  # fmt: skip
        _check(all(v > 0 for v in self.fit_mu) and self.fit_mu, f"{path}.fit_mu", self.fit_mu, "must be values > 0")
        _check(all(v > 0 for v in self.fit_proxy_temperature) and self.fit_proxy_temperature,
               f"{path}.fit_proxy_temperature", self.fit_proxy_temperature, "must be values > 0")  # fmt: skip
        _check(self.fit_orders is None or all(o >= 1 for o in self.fit_orders), f"{path}.fit_orders",
               self.fit_orders, "must be orders >= 1 or null")  # fmt: skip
        _check(self.fit_positions >= 1, f"{path}.fit_positions", self.fit_positions, "must be >= 1")
        _check(self.mode != "sampled" or float(self.m).is_integer() or self.m == float("inf"), f"{path}.m", self.m,
               "must be a whole number of draws (or .inf) for mode sampled")  # fmt: skip
        _check(self.proxy_temperature > 0, f"{path}.proxy_temperature", self.proxy_temperature, "must be > 0")
        _check(self.top_k >= 1, f"{path}.top_k", self.top_k, "must be >= 1")
        _check(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, "must be >= 1")
        top = self.top_logprobs
        _check(top is None or 0 <= top <= 20, f"{path}.top_logprobs", top, "must be in 0..20 or null")


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
        _check(self.budget_tokens is None or self.budget_tokens > 0, f"{path}.budget_tokens", self.budget_tokens, "must be > 0 or null")
        for name in ("samples", "max_tokens", "round_size", "max_queries_per_position"):
            _check(getattr(self, name) >= 1, f"{path}.{name}", getattr(self, name), "must be >= 1")


@dataclass
class DistillConfig:
    """Stage `distill`: train one student per mode (method.md, sections 3-4).

    L = lambda_ce * CE(y) + alpha * KL(p_prior || p_S) + beta * KL(p_target || p_S), per response token,
    with alpha + beta = kd_weight in every KD mode (`bayes`: alpha = prior_share * kd_weight).
    `sft`: CE only. `bayes`: prior and posterior. `prior-only` / `posterior-only`: one of them.
    `proxy-kd`: the proxy's own distribution as target, with Proxy-KD's per-sample weights.
    `topk-kd`: the API's own top-k logprobs as target, the rest as one tail bucket (no prior, no
    proxy; needs a corpus collected with `collect.top_logprobs` > 0): the baseline of a logprob user.
    `oracle-kd`: the true teacher distribution (only for a local open teacher): an upper bound.
    """

    RENAMED: typing.ClassVar[dict[str, str]] = {
        "alpha": "replaced by kd_weight and prior_share (alpha = prior_share * kd_weight), so that every KD mode has the same total KD weight",
        "beta": "replaced by kd_weight (the total KD weight of every mode) and prior_share (bayes: beta = (1 - prior_share) * kd_weight)",
    }

    modes: list[Literal["sft", "bayes", "prior-only", "posterior-only", "proxy-kd", "topk-kd", "oracle-kd"]] = field(
        default_factory=lambda: ["sft"]
    )
    """Students to train, one per mode, each in `distill/<mode>/`."""
    lambda_ce: float = 1.0
    """Weight of cross-entropy on the teacher's tokens (all modes; never scaled by Proxy-KD's sample weights)."""
    kd_weight: float = 1.0
    """Total weight of the KL terms, the same for every KD mode so that no mode gets more
    distillation than another: `bayes` splits it between the prior and the posterior
    (`prior_share`), the other modes put it all on their one target."""
    prior_share: float = 1 / 3
    """`bayes`: the share of `kd_weight` on KL to the prior (alpha = prior_share * kd_weight); the
    rest goes to KL to the posterior (beta). 1/3 keeps the 1 : 2 split of the method's first
    objective (alpha 0.5, beta 1). `prior-only` puts all of `kd_weight` on the prior."""
    tau: float = 1.0
    """Student temperature in the KL terms (scaled by tau^2)."""
    fit: Literal["none", "auto"] = "none"
    """`auto`: every KD mode trains one student per (kd_weight, tau) of the grids below and keeps
    the one with the lowest black-box NLL of the teacher's tokens on the validation split (needs
    data.validation_fraction > 0): each mode gets the same tuning, by the same criterion, and no
    oracle. The grid's scores are in the mode's manifest. `none`: the values as set."""
    fit_kd_weight: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    """`auto`: the total KD weights tried (`kd_weight` is always one of them)."""
    fit_tau: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """`auto`: the student temperatures tried (`tau` is always one of them)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(init_layers=4, max_steps=60, lr=5e-4))
    """The student: `train.model` (with `train.init_layers`) is its initialisation; its tokenizer defines every token-level quantity."""

    def validate(self, path: str) -> None:
        _check(len(self.modes) >= 1, f"{path}.modes", self.modes, "must name at least one mode")
        _check(len(set(self.modes)) == len(self.modes), f"{path}.modes", self.modes, "must not repeat a mode")
        for name in ("lambda_ce", "kd_weight"):
            v = getattr(self, name)
            _check(v >= 0, f"{path}.{name}", v, "must be >= 0")
        _check(0 <= self.prior_share <= 1, f"{path}.prior_share", self.prior_share, "must be in [0, 1]")
        _check(self.tau > 0, f"{path}.tau", self.tau, "must be > 0")
        _check(bool(self.fit_kd_weight) and all(v >= 0 for v in self.fit_kd_weight), f"{path}.fit_kd_weight",
               self.fit_kd_weight, "must be values >= 0")  # fmt: skip
        _check(bool(self.fit_tau) and all(v > 0 for v in self.fit_tau), f"{path}.fit_tau", self.fit_tau, "must be values > 0")
        self.train.validate(f"{path}.train")


@dataclass
class EvalConfig:
    """Stage `eval`: students and estimates on held-out prompts (method.md, section 5)."""

    max_examples: int = 64
    """Held-out examples to score (the first ones of the held-out split)."""
    max_new_tokens: int | None = None
    """Greedy generation length for ROUGE-L and exact match (default: collect.max_tokens)."""
    oracle: bool = True
    """Use the teacher as an oracle (KL to the teacher, fidelity) when it is a local open model."""
    oracle_model: str | None = None
    """The open model behind a served teacher (`teacher.backend: openai` pointing at `bayeskd serve`,
    vLLM, ...), loaded as the oracle by `eval` and `distill` mode `oracle-kd` only; the method's
    stages never read it. Null: the teacher itself when `teacher.backend` is `local`, else no oracle."""
    estimates: bool = True
    """Measure the estimates' fidelity (needs the oracle); false scores the students alone."""
    fidelity_positions: int = 1500
    """Most positions per setting (training, held-out) for the dense fidelity measures."""
    one_hot_eps: float = 0.1
    """Smoothing of the one-hot estimate: 1 - eps on the realised token."""
    control_lambdas: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    """Grid for the control lambda * one-hot + (1 - lambda) * proxy; the best is reported."""
    batch_size: int = 8

    def validate(self, path: str) -> None:
        _check(self.max_examples >= 1, f"{path}.max_examples", self.max_examples, "must be >= 1")
        _check(0 < self.one_hot_eps < 1, f"{path}.one_hot_eps", self.one_hot_eps, "must be in (0, 1)")
        _check(all(0 <= x <= 1 for x in self.control_lambdas), f"{path}.control_lambdas", self.control_lambdas, "must be in [0, 1]")
        _check(self.fidelity_positions >= 1, f"{path}.fidelity_positions", self.fidelity_positions, "must be >= 1")
        _check(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, "must be >= 1")


@dataclass
class ServeConfig:
    """`bayeskd serve`: an OpenAI-compatible server in front of a local model."""

    host: str = "127.0.0.1"
    """Bind address. Loopback by default; bind elsewhere only on purpose."""
    port: int = 8000
    """TCP port; 0 picks a free one."""
    model_name: str | None = None
    """The model name clients ask for (vLLM's --served-model-name); null: teacher.model. A name
    lets clients address a private model without knowing where its weights live."""
    api_key_env: str | None = None
    """If set, the environment variable holding the bearer token that clients must send."""
    max_tokens_limit: int = 1024
    """Requests asking for more `max_tokens` are refused with 400."""
    max_n: int = 16
    max_batch: int = 64
    """Rows (one per sample) the served model decodes together (its `teacher.batch_size`);
    requests beyond them wait in the queue. Below teacher.batch_size because a served request
    may ask for up to max_tokens_limit tokens, and the KV cache holds rows x (prompt + max_tokens)."""
    batch_wait_ms: float = 10.0
    """How long the batcher gathers requests that arrive together, so that their prompts are prefilled in one forward."""
    max_queue: int = 256
    """Requests waiting beyond this are shed with 429 and Retry-After."""
    max_body_bytes: int = 1_000_000
    """Larger request bodies are refused with 413."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Fault injection for reliability tests; off unless a rate is set."""
    quirks: list[str] = field(default_factory=list)
    """Behaviours of third-party servers, reproduced on purpose so that clients can be tested
    against them (off by default): `ignore_n` answers one choice whatever `n` asks (llama.cpp's
    server); `empty_end_of_turn` answers a sample whose first token ends the turn with text "",
    finish reason `stop`, no logprobs and no completion tokens (llama.cpp again), where this
    server counts the end-of-turn token and lists it."""

    def validate(self, path: str) -> None:
        _check(0 <= self.port <= 65535, f"{path}.port", self.port, "must be a TCP port (0: any free one)")
        for i, quirk in enumerate(self.quirks):
            _check(quirk in QUIRKS, f"{path}.quirks[{i}]", quirk, f"unknown quirk; known: {', '.join(QUIRKS)}")
        for name in ("max_tokens_limit", "max_n", "max_batch", "max_queue", "max_body_bytes"):
            v = getattr(self, name)
            _check(v >= 1, f"{path}.{name}", v, "must be >= 1")
        self.faults.validate(f"{path}.faults")


@dataclass
class Config:
    """A whole run: where it lives, its seed, the teacher, and one section per stage."""

    run_dir: str = "runs/default"
    """Folder of the run: one sub-folder per stage, each with a manifest."""
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    @property
    def student_model(self) -> str:
        """The student's model reference: its tokenizer is the one every token-level quantity uses."""
        return self.distill.train.model

    @property
    def target_stage(self) -> str:
        """The stage whose `targets/` the Bayesian students train on: `probe` when it spends a budget."""
        return "probe" if self.probe.budget_tokens is not None else "posterior"

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        return self


# ---------------------------------------------------------------- loading and overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check (and minimally coerce) `value` against the annotation `tp`, naming `path` on error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}={value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r}: must be one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r}: expected a list")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        return {k: _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()} if args else dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")  # a bug in this module, not in the YAML


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}={data!r}: expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for key in unknown:
        if key in getattr(cls, "RENAMED", {}):
            raise ConfigError(f"{path + '.' if path else ''}{key}: {cls.RENAMED[key]}")
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; {cls.__name__} has: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                # A partial section overrides the field's own defaults, not the bare class's.
                value = _deep_merge(dataclasses.asdict(default), value)
        kwargs[f.name] = _coerce(value, hints[f.name], f"{path}.{f.name}" if path else f.name)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`collect.max_tokens=64` -> ("collect.max_tokens", 64). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. collect.max_tokens=64")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={raw!r}: not a valid YAML value ({e})") from e
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides, validate."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "").validate()


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
