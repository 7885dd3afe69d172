"""The one training loop, on accelerate, shared by proxy alignment and student distillation.

They differ only in the data and in `loss_fn(logits, batch) -> LossOutput`:

- `logits` [B, T, V] is the model's output for the batch's model inputs (`input_ids`, and
  `attention_mask` or `position_ids` where present);
- `batch` is the collated dict (see `data.Collator`), on the device; `labels` [B, T] is
  required, because the loop counts target tokens as `labels[:, 1:] != -100` (the losses'
  causal-shift convention);
- the loss is the SUM over the batch's target tokens. The loop divides by the number of
  target tokens of the whole optimizer step, over micro-steps and processes, so the gradient
  is the same for any split of a global batch into processes and accumulation steps.
  `LossOutput.parts` (detached sums) are logged the same way; a plain (loss_sum, n_tokens)
  tuple works too. A loss over whole sequences (DPO: one term per preference pair) puts its
  count in the batch as `loss_units` (a scalar tensor), which the loop then counts instead.

Data order is a pure function of (seed, step): epoch e visits the examples in the
permutation seeded by (seed, e), the stream runs on across epochs, and global micro-batch g
takes stream items [g * B * P, (g + 1) * B * P), process p its p-th slice of B. Resuming at
step s therefore needs no sampler state: the stream restarts at s * grad_accum micro-batches.

Checkpoints and the final model: `checkpoints.py`.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, get_scheduler

from bayeskd.train.checkpoints import load_latest, replace_dir, save_checkpoint, save_final
from bayeskd.train.config import LoraConfig, TrainConfig
from bayeskd.data import IGNORE_INDEX
from bayeskd.train.losses import LossOutput

LOG_NAME = "train_log.jsonl"
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")

LossFn = Callable[[Tensor, Mapping[str, Tensor]], "LossOutput | tuple[Tensor, Tensor]"]
CollateFn = Callable[[list[Mapping[str, Any]]], dict[str, Tensor]]


@dataclass
class TrainResult:
    """What `train` leaves behind."""

    model: Any  # the trained model, unwrapped (LoRA merged), in eval mode
    final_dir: Path  # Hugging Face folder: from_pretrained(final_dir) loads it
    step: int  # optimizer steps done in total
    resumed_from: int | None  # step of the checkpoint this run started from
    last: dict = field(default_factory=dict)  # the last train_log.jsonl record


def resolve_mixed_precision(setting: str) -> str:
    """`auto` -> bf16 on a CUDA device that supports it, else no; other settings pass through."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


# ---------------------------------------------------------------- data order


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items [start, start + count) of the endless stream of per-epoch permutations of range(n)."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        take = _epoch_permutation(n, seed, epoch)[offset : offset + count - len(out)]
        out += take.tolist()
        pos += len(take)
    return out


def _micro_batches(
    data: Sequence, collate_fn: CollateFn, batch_size: int, seed: int, start_micro: int, rank: int, world: int
) -> Iterator[dict[str, Tensor]]:
    """This process's micro-batches from global micro-batch `start_micro` on."""
    if len(data) == 0:
        raise ValueError("train: the training data is empty")
    g = start_micro
    while True:
        ids = _stream_indices(len(data), seed, (g * world + rank) * batch_size, batch_size)
        yield collate_fn([data[i] for i in ids])
        g += 1


# ---------------------------------------------------------------- model, optimizer


def _with_lora(model: Any, lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def _forward(model: Any, batch: Mapping[str, Tensor]) -> Tensor:
    # use_cache=False: no KV cache to build in training, and transformers only derives the
    # block-diagonal mask of packed rows from position_ids when there is no cache.
    return model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, use_cache=False).logits


def _as_output(out: LossOutput | tuple) -> LossOutput:
    return out if isinstance(out, LossOutput) else LossOutput(out[0], out[1], {})


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _n_targets(batch: Mapping[str, Tensor]) -> Tensor:
    """What the loss's sum is divided by: the batch's `loss_units` if it has them, else its target tokens."""
    if "loss_units" in batch:
        return batch["loss_units"].sum()
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def _n_inputs(batch: Mapping[str, Tensor]) -> Tensor:
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel())


# ---------------------------------------------------------------- steps


def _reduced_means(accelerator: Accelerator, sums: dict[str, Tensor], count: Tensor) -> dict[str, float]:
    """Sum each value over processes and divide by the (already global) count."""
    keys = sorted(sums)
    if not keys:
        return {}
    total = accelerator.reduce(torch.stack([sums[k].float() for k in keys]), "sum")
    return {k: float(v) / max(1, int(count)) for k, v in zip(keys, total)}


def _train_step(accelerator: Accelerator, model, optimizer, scheduler, loss_fn: LossFn, micro: list, cfg) -> dict:
    """One optimizer step over `micro` (grad_accum micro-batches); returns global means and counts."""
    counts = torch.stack([sum(_n_targets(b) for b in micro), sum(_n_inputs(b) for b in micro)])
    n_targets, n_inputs = accelerator.reduce(counts.to(accelerator.device), "sum")
    # accelerate divides by grad_accum and DDP averages over processes: undo both, then
    # normalise by the step's global number of target tokens.
    scale = accelerator.num_processes * cfg.grad_accum / n_targets.clamp_min(1).float()
    sums: dict[str, Tensor] = {}
    for batch in micro:
        batch = _to_device(batch, accelerator.device)
        with accelerator.accumulate(model):
            out = _as_output(loss_fn(_forward(model, batch), batch))
            accelerator.backward(out.loss * scale)
        for k, v in {"loss": out.loss, **out.parts}.items():
            sums[k] = sums.get(k, 0) + v.detach()
    if not accelerator.sync_gradients:
        raise RuntimeError("train: gradient accumulation is out of step with accelerate's counter")
    record: dict[str, Any] = {"lr": scheduler.get_last_lr()[0]}
    if cfg.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        record["grad_norm"] = float(norm) if norm is not None else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    record.update(_reduced_means(accelerator, sums, n_targets))
    record.update(n_targets=int(n_targets), n_inputs=int(n_inputs))
    return record


@torch.no_grad()
def evaluate(
    accelerator: Accelerator, model: Any, data: Sequence, loss_fn: LossFn, collate_fn: CollateFn, batch_size: int
) -> dict[str, float]:
    """Token-mean loss (and parts) of `loss_fn` over `data`, shared across processes.

    Process p takes examples p, p + P, ...; every process runs the same number of forward
    passes (a process short of examples repeats one and discards it), as FSDP and
    DeepSpeed ZeRO-3 require.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(data), world))
    n_batches = math.ceil(math.ceil(len(data) / world) / batch_size)
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    n = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for i in range(n_batches):
        ids = mine[i * batch_size : (i + 1) * batch_size]
        batch = _to_device(collate_fn([data[j] for j in (ids or [0])]), accelerator.device)
        out = _as_output(loss_fn(_forward(model, batch), batch))
        keep = 1.0 if ids else 0.0
        for k, v in {"loss": out.loss, **out.parts}.items():
            sums[k] = sums.get(k, 0) + keep * v.detach().float()
        n += int(keep) * out.n_tokens
    model.train(was_training)
    n_total = accelerator.reduce(n, "sum")
    means = _reduced_means(accelerator, sums, n_total)
    return {f"eval_{k}": v for k, v in means.items()} | {"eval_tokens": int(n_total)}


# ---------------------------------------------------------------- the loop


class _Log:
    """train_log.jsonl (main process), the progress bar, and throughput since the last record.

    A resumed run first drops the records past its checkpoint (the killed run wrote them, the
    resumed run writes them again); `elapsed` continues from the checkpoint's.
    """

    def __init__(self, path: Path, main: bool, start: int, total: int, progress: bool, elapsed: float) -> None:
        self.path, self.main = path, main
        if main and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
            path.write_text("".join(line + "\n" for line in kept))
        self.bar = tqdm(total=total, initial=start, disable=not (main and progress), desc="train", dynamic_ncols=True)
        self.t0, self.elapsed0 = time.perf_counter(), elapsed
        self.restart_window()

    def restart_window(self) -> None:
        """Start a new throughput window (after a checkpoint, so that saving does not count)."""
        self.since, self.tokens = time.perf_counter(), 0

    def count(self, n_inputs: int) -> None:
        self.tokens += n_inputs
        self.bar.update(1)

    def throughput(self) -> float:
        """Input tokens per second (all processes) since the window started; starts a new window."""
        rate = self.tokens / max(time.perf_counter() - self.since, 1e-9)
        self.restart_window()
        return rate

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0

    def write(self, record: dict) -> dict:
        record = {**record, "elapsed": self.elapsed()}
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            shown = {k: record[k] for k in ("loss", "eval_loss", "lr", "tokens_per_s") if k in record}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        return record

    def close(self) -> None:
        self.bar.close()


def _due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def train(
    model: Any,
    train_data: Sequence,
    loss_fn: LossFn,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    collate_fn: CollateFn,
    eval_data: Sequence | None = None,
    select_data: Sequence | None = None,
    select_loss_fn: LossFn | None = None,
    tokenizer: Any = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train `model` for cfg.max_steps optimizer steps; resume from out_dir's latest checkpoint.

    train_data / eval_data: indexable example sequences (a `datasets.Dataset` or a list of
    rows) that `collate_fn` turns into batches. Runs as-is under `accelerate launch` on any
    number of processes. Writes out_dir/train_log.jsonl, out_dir/checkpoints/ and out_dir/final/
    (with `tokenizer`, if given). Resuming expects the same config and data as the first run.

    With `cfg.select == "best_validation"`, `select_loss_fn` (a token-mean loss, e.g. the CE of
    the teacher's tokens) is measured on `select_data` every `cfg.eval_every` steps and at the
    last one (logged as `select_loss`); the model at the lowest is kept in out_dir/best/ as it
    goes and becomes out_dir/final/ at the end: early stopping without stopping, so that every
    model reads the same steps and keeps its own best point.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    precision = resolve_mixed_precision(cfg.mixed_precision)
    if AcceleratorState._shared_state.get("_mixed_precision") not in (None, precision):
        # One process may train several models (`bayeskd run`: the proxy, then each student)
        # with different precisions, and accelerate keeps one global state that refuses a new
        # precision. Start that state afresh; the process group (PartialState) stays.
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum,
        # The schedule counts optimizer steps; accelerate would otherwise step it once per process.
        step_scheduler_with_optimizer=False,
    )
    set_seed(cfg.seed)  # LoRA's init and dropout; data order has its own seeded permutations
    if cfg.lora.enabled:
        model = _with_lora(model, cfg.lora)
    optimizer = _optimizer(model, cfg)
    schedule = "cosine" if cfg.schedule == "cosine" else "constant_with_warmup"
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start, state = load_latest(accelerator, out) if resume else (0, {})
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = _micro_batches(train_data, collate_fn, cfg.batch_size, cfg.seed, start * cfg.grad_accum, rank, world)
    log = _Log(out / LOG_NAME, accelerator.is_main_process, start, cfg.max_steps, progress, state.get("elapsed", 0.0))
    model.train()
    last: dict = {}
    selecting = cfg.select == "best_validation"
    if selecting and (not select_data or select_loss_fn is None):
        raise ValueError("train: select=best_validation needs select_data (the validation split) and select_loss_fn")
    best = {k: state[k] for k in ("best_loss", "best_step") if k in state}
    for step in range(start + 1, cfg.max_steps + 1):
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        record = _train_step(accelerator, model, optimizer, scheduler, loss_fn, micro, cfg)
        log.count(record.pop("n_inputs"))
        final_step = step == cfg.max_steps
        eval_now = eval_data is not None and (_due(step, cfg.eval_every) or final_step)
        select_now = selecting and (_due(step, cfg.eval_every) or final_step)
        if _due(step, cfg.log_every) or eval_now or select_now or final_step:
            record["tokens_per_s"] = log.throughput()
            if eval_now:
                record.update(evaluate(accelerator, model, eval_data, loss_fn, collate_fn, cfg.batch_size))
            if select_now:
                value = evaluate(accelerator, model, select_data, select_loss_fn, collate_fn, cfg.batch_size)["eval_loss"]
                record["select_loss"] = value
                if value < best.get("best_loss", math.inf):
                    best = {"best_loss": value, "best_step": step}
                    save_final(accelerator, model, out, tokenizer, cfg.lora.enabled, name="best")
                    model.train()  # the save hands back the model in eval mode; training goes on
                record.update(best)
            last = log.write({"step": step, **record})
        if _due(step, cfg.save_every) or final_step:
            save_checkpoint(accelerator, out, step, {"elapsed": log.elapsed(), **best}, cfg.keep_checkpoints)
            log.restart_window()
    log.close()
    if not last and start >= cfg.max_steps and (out / LOG_NAME).is_file():
        # Killed after the last checkpoint: no step ran now, so the summary takes the logged last step.
        lines = (out / LOG_NAME).read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    if not selecting:
        trained, final = save_final(accelerator, model, out, tokenizer, cfg.lora.enabled)
    else:  # the best-scored model, saved as it came (out/best, LoRA merged), becomes final/
        final = out / "final"
        if accelerator.is_main_process:  # a copy, not a move: a rerun after a kill here finds best/ again
            shutil.rmtree(out / ".tmp-final", ignore_errors=True)  # left by a kill mid-copy
            shutil.copytree(out / "best", out / ".tmp-final")
            replace_dir(out / ".tmp-final", final)
        accelerator.wait_for_everyone()
        trained = AutoModelForCausalLM.from_pretrained(final).eval()
        last = {**last, **best}
    return TrainResult(trained, final, max(start, cfg.max_steps), start or None, last)
