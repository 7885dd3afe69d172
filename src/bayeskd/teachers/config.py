"""Options of the teacher path: the endpoint (`teacher`), `collect`, its price table, and `bayeskd serve`
(with its fault injection and quirks). Loaded by `bayeskd.config`; imports nothing of bayeskd but errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from bayeskd.errors import check


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
        check(self.max_concurrency >= 1, f"{path}.max_concurrency", self.max_concurrency, "must be >= 1")
        check(self.timeout_s > 0, f"{path}.timeout_s", self.timeout_s, "must be > 0")
        check(self.max_retries >= 0, f"{path}.max_retries", self.max_retries, "must be >= 0")
        check(self.down_after >= 0, f"{path}.down_after", self.down_after, "must be >= 0")
        check(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, "must be >= 1")
        check(bool(self.model), f"{path}.model", self.model, "must name a model")
        for key in self.extra_body:
            check(key not in REQUEST_FIELDS, f"{path}.extra_body.{key}", self.extra_body[key],
                   "bayeskd sets this field itself (from collect.* and probe.*); extra_body is for the server's own")  # fmt: skip
        check(self.backend != "local" or self.logprobs_are == "raw", f"{path}.logprobs_are", self.logprobs_are,
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
    batch_discount: float = 0.5
    """The share of the online price that a token costs when it is collected through a Batch API
    (`collect.mode: batch`): 0.5 is OpenAI's half price for batches. Applies to the ledger's cost
    and to `collect.budget_cost`; token counts and `budget_tokens` are not discounted."""

    def validate(self, path: str) -> None:
        check(self.prompt_per_1k >= 0, f"{path}.prompt_per_1k", self.prompt_per_1k, "must be >= 0")
        check(self.completion_per_1k >= 0, f"{path}.completion_per_1k", self.completion_per_1k, "must be >= 0")
        check(0 <= self.batch_discount <= 1, f"{path}.batch_discount", self.batch_discount, "must be in [0, 1]")


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
    mode: Literal["online", "batch"] = "online"
    """`online`: one request per prompt, answers as they come. `batch` (teacher.backend openai,
    endpoint chat): every missing sample becomes one line of an OpenAI Batch JSONL file
    (`collect/batch-input.jsonl`, custom_id = the sample's store key, n = 1 with the sample's
    seed), uploaded through `/v1/files` and run by `/v1/batches`; the answers are stored as online
    ones are, priced with `price.batch_discount`. The batch id is kept in `collect/batch.json`
    before the first poll: a rerun after a kill picks up the same batch and never submits twice;
    a rerun after a partly failed batch submits a new one of the missing samples only."""
    batch_poll_s: float = 5.0
    """batch: first delay between two looks at the batch's status; each next one is 1.5 times longer, up to `batch_poll_max_s`."""
    batch_poll_max_s: float = 60.0
    """batch: longest delay between two looks at the batch's status."""
    batch_window: str = "24h"
    """batch: the completion window asked for (OpenAI accepts only `24h`)."""

    def validate(self, path: str) -> None:
        check(self.n >= 1, f"{path}.n", self.n, "must be >= 1")
        check(self.max_tokens >= 1, f"{path}.max_tokens", self.max_tokens, "must be >= 1")
        check(0 <= self.top_logprobs <= 20, f"{path}.top_logprobs", self.top_logprobs, "must be in 0..20")
        check(self.temperature >= 0, f"{path}.temperature", self.temperature, "must be >= 0")
        check(0 < self.top_p <= 1, f"{path}.top_p", self.top_p, "must be in (0, 1]")
        check(self.limit is None or self.limit >= 1, f"{path}.limit", self.limit, "must be >= 1 or null")
        check(self.flush_every >= 1, f"{path}.flush_every", self.flush_every, "must be >= 1")
        for name in ("budget_tokens", "budget_cost"):
            v = getattr(self, name)
            check(v is None or v > 0, f"{path}.{name}", v, "must be > 0 or null")
        check(self.batch_poll_s > 0, f"{path}.batch_poll_s", self.batch_poll_s, "must be > 0")
        check(self.batch_poll_max_s >= self.batch_poll_s, f"{path}.batch_poll_max_s", self.batch_poll_max_s,
              "must be >= collect.batch_poll_s")  # fmt: skip
        self.price.validate(f"{path}.price")


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
            check(0 <= v <= 1, f"{path}.{name}", v, "must be in [0, 1]")
        total = sum(getattr(self, k) for k in FAULT_KINDS)
        check(total <= 1, path, {k: getattr(self, k) for k in FAULT_KINDS if getattr(self, k)}, "rates must sum to <= 1")
        check(self.retry_after_s >= 0, f"{path}.retry_after_s", self.retry_after_s, "must be >= 0")
        check(self.slow_s > 0, f"{path}.slow_s", self.slow_s, "must be > 0")
        check(self.die_after is None or self.die_after >= 0, f"{path}.die_after", self.die_after, "must be >= 0")


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
    """Larger request bodies are refused with 413 (uploads to `/v1/files`: `max_file_bytes`)."""
    max_file_bytes: int = 200_000_000
    """Larger uploads to `/v1/files` (a Batch API input file) are refused with 413; OpenAI's limit is 200 MB."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Fault injection for reliability tests; off unless a rate is set."""
    quirks: list[str] = field(default_factory=list)
    """Behaviours of third-party servers, reproduced on purpose so that clients can be tested
    against them (off by default): `ignore_n` answers one choice whatever `n` asks (llama.cpp's
    server); `empty_end_of_turn` answers a sample whose first token ends the turn with text "",
    finish reason `stop`, no logprobs and no completion tokens (llama.cpp again), where this
    server counts the end-of-turn token and lists it."""

    def validate(self, path: str) -> None:
        check(0 <= self.port <= 65535, f"{path}.port", self.port, "must be a TCP port (0: any free one)")
        for i, quirk in enumerate(self.quirks):
            check(quirk in QUIRKS, f"{path}.quirks[{i}]", quirk, f"unknown quirk; known: {', '.join(QUIRKS)}")
        for name in ("max_tokens_limit", "max_n", "max_batch", "max_queue", "max_body_bytes", "max_file_bytes"):
            v = getattr(self, name)
            check(v >= 1, f"{path}.{name}", v, "must be >= 1")
        self.faults.validate(f"{path}.faults")
