"""Options of training: the loop (`train`, with LoRA), how records become tokens (`data`), the
`proxy` (with its DPO step) and `distill`. Loaded by `bayeskd.config`; imports nothing of bayeskd but errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from bayeskd.errors import check


def fields_except(section: Any, *names: str) -> dict:
    """A config section as a dict without the fields that change how a stage computes, not what
    (process counts, worker counts): what stage fingerprints include."""
    return {k: v for k, v in dataclasses.asdict(section).items() if k not in names}


@dataclass
class LoraConfig:
    """LoRA adapters through `peft` (off by default: full fine-tuning)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self, path: str) -> None:
        check(self.r >= 1, f"{path}.r", self.r, "must be >= 1")
        check(0 <= self.dropout < 1, f"{path}.dropout", self.dropout, "must be in [0, 1)")


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
        return fields_except(self, *(("init",) if self.init == "pretrained" else ()), *(("select",) if self.select == "last" else ()))

    def validate(self, path: str) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            check(v >= 1, f"{path}.{name}", v, "must be >= 1")
        for name in ("warmup_steps", "eval_every", "save_every"):
            v = getattr(self, name)
            check(v >= 0, f"{path}.{name}", v, "must be >= 0")
        check(self.lr > 0, f"{path}.lr", self.lr, "must be > 0")
        check(self.max_grad_norm >= 0, f"{path}.max_grad_norm", self.max_grad_norm, "must be >= 0")
        self.lora.validate(f"{path}.lora")
        check(self.init_layers is None or self.init_layers >= 1, f"{path}.init_layers", self.init_layers, "must be >= 1 or null")
        check(self.select == "last" or self.eval_every > 0, f"{path}.eval_every", self.eval_every,
               "must be > 0 with select: best_validation (how often the validation split is scored)")  # fmt: skip


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
        return fields_except(self, "num_proc", *(() if self.validation_fraction else ("validation_fraction",)),
                              *(() if self.split != "hash" else ("split",)))  # fmt: skip

    def validate(self, path: str) -> None:
        check(self.max_length >= 8, f"{path}.max_length", self.max_length, "must be >= 8")
        check(self.num_proc >= 1, f"{path}.num_proc", self.num_proc, "must be >= 1")
        check(0 <= self.heldout_fraction < 1, f"{path}.heldout_fraction", self.heldout_fraction, "must be in [0, 1)")
        check(0 <= self.validation_fraction < 1, f"{path}.validation_fraction", self.validation_fraction, "must be in [0, 1)")
        for name in ("train_prompts", "samples"):
            v = getattr(self, name)
            check(v is None or v >= 1, f"{path}.{name}", v, "must be >= 1 or null")


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
        check(self.beta > 0, f"{path}.beta", self.beta, "must be > 0")
        check(self.temperature > 0, f"{path}.temperature", self.temperature, "must be > 0 (the proxy samples)")
        check(self.lr > 0, f"{path}.lr", self.lr, "must be > 0")
        for name in ("samples", "max_steps", "batch_size"):
            check(getattr(self, name) >= 1, f"{path}.{name}", getattr(self, name), "must be >= 1")
        for name in ("warmup_steps", "save_every"):
            check(getattr(self, name) >= 0, f"{path}.{name}", getattr(self, name), "must be >= 0")
        v = self.max_new_tokens
        check(v is None or v >= 1, f"{path}.max_new_tokens", v, "must be >= 1 or null")

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

    RENAMED: ClassVar[dict[str, str]] = {
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
    proxy_kd_weights: bool = True
    """`proxy-kd`: scale each record's KL by Proxy-KD's weight, sigmoid of the proxy's standardised
    log-likelihood of the teacher's response (their mean is about 0.5, so the mode's KD term is
    about half of `kd_weight` on average). false: every record weight 1 (an ablation)."""
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
        check(len(self.modes) >= 1, f"{path}.modes", self.modes, "must name at least one mode")
        check(len(set(self.modes)) == len(self.modes), f"{path}.modes", self.modes, "must not repeat a mode")
        for name in ("lambda_ce", "kd_weight"):
            v = getattr(self, name)
            check(v >= 0, f"{path}.{name}", v, "must be >= 0")
        check(0 <= self.prior_share <= 1, f"{path}.prior_share", self.prior_share, "must be in [0, 1]")
        check(self.tau > 0, f"{path}.tau", self.tau, "must be > 0")
        check(bool(self.fit_kd_weight) and all(v >= 0 for v in self.fit_kd_weight), f"{path}.fit_kd_weight",
               self.fit_kd_weight, "must be values >= 0")  # fmt: skip
        check(bool(self.fit_tau) and all(v > 0 for v in self.fit_tau), f"{path}.fit_tau", self.fit_tau, "must be values > 0")
        self.train.validate(f"{path}.train")
