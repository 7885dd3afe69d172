"""Preference pairs for the proxy's DPO step (`proxy.align: sft+dpo`): the teacher's response preferred over the proxy's own.

Proxy-KD aligns its proxy in two steps: fine-tuning on the teacher's responses, then
preference optimisation in which, for the same prompt, the teacher's response (y_w) is
preferred over one the proxy sampled itself (y_l). Here:

- the prompts are the corpus's *training* prompts only: nothing is sampled, scored or trained
  on the held-out or validation prompts, so `eval` and `posterior.fit` stay untouched;
- the proxy continues exactly the token prefix that its training example holds (the prompt as
  `data.template` formats it), with the teacher decoder's batched sampler
  (`teachers.decoding.Decoder`). Sample j of a prompt draws its uniforms from a generator
  seeded by (proxy.dpo.seed, prompt id, j), so a rerun (a resume after a kill) samples the same;
- the rejected sequence is that prefix and the sampled tokens, as sampled (the EOS, when the
  proxy stopped, is a target; a response cut at max_new_tokens has none), cut at
  data.max_length; the chosen is the training example itself, as SFT saw it. A sample equal to
  the teacher's response is no preference and is dropped;
- the frozen reference (the SFT proxy) scores every pair once, before training: `ref_chosen`,
  `ref_rejected`, its sequence log-probabilities. DPO is then a loss of the policy alone
  (`losses.make_dpo_loss_fn`) inside the one training loop, over `PairCollator` batches.

No teacher is called: only the proxy generates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from bayeskd.corpus import TokenizedCorpus
from bayeskd.data import IGNORE_INDEX, Collator
from bayeskd.teachers.base import content_key
from bayeskd.teachers.decoding import Decoder, Row
from bayeskd.train.losses import LossOutput, _shift, cross_entropy

SAMPLE_ROWS = 64
"""Proxy samples decoded together."""


def training_prompts(corpus: TokenizedCorpus) -> dict[str, dict]:
    """prompt id -> {prefix: its token prefix, examples: its training examples' dataset positions}, training split only.

    The examples of one prompt share its prefix (the same messages, the same template); one
    whose prefix differs (a truncation inside the prompt) is left out of the pairs."""
    prompts: dict[str, dict] = {}
    data = corpus.dataset
    for i in corpus.indices("train"):
        ids, n = data[i]["input_ids"], data[i]["n_response"]
        prefix = list(ids[: len(ids) - n])
        entry = prompts.setdefault(data[i]["prompt_id"], {"prefix": prefix, "examples": []})
        if entry["prefix"] == prefix:
            entry["examples"].append(i)
    return prompts


def sample_responses(
    model: Any, tokenizer: Any, prefixes: dict[str, list[int]], samples: int, max_tokens: int, max_length: int,
    temperature: float, seed: int,
) -> dict[tuple[str, int], tuple[list[int], str]]:
    """(prompt id, j) -> (the tokens the model sampled after that prompt's prefix, finish reason), for j < samples.

    Each response stops at the EOS, at max_tokens, or where the sequence reaches max_length.
    """
    rows = []
    for pid, prefix in prefixes.items():
        room = min(max_tokens, max_length - len(prefix))
        if room < 1:
            continue
        for j in range(samples):
            g = torch.Generator().manual_seed(int(content_key(seed, pid, j), 16) % 2**63)
            rows.append(Row(key=(pid, j), prompt=prefix, temperature=temperature, max_tokens=room,
                            uniforms=torch.rand(room, generator=g).tolist()))  # fmt: skip
    if not rows:
        return {}
    decoder = Decoder(model, min(SAMPLE_ROWS, len(rows)), tokenizer.eos_token_id, tokenizer.pad_token_id,
                      lambda ids: tokenizer.decode(ids, skip_special_tokens=True))  # fmt: skip
    decoder.add(rows)
    with tqdm(total=len(rows), desc="proxy: dpo samples", unit="sample", dynamic_ncols=True) as bar:
        while decoder.rows_in_flight:
            bar.update(len(decoder.step()))
    return {r.key: (r.tokens, r.finish or "length") for r in rows}


def build_pairs(
    corpus: TokenizedCorpus, model: Any, samples: int, max_tokens: int, max_length: int, temperature: float, seed: int
) -> list[dict]:
    """The preference pairs of the training prompts: each teacher response (chosen) against each of
    `samples` responses the model samples to the same prompt (rejected). Token ids, as trained on."""
    prompts = training_prompts(corpus)
    drawn = sample_responses(model, corpus.tokenizer, {p: e["prefix"] for p, e in prompts.items()}, samples,
                             max_tokens, max_length, temperature, seed)  # fmt: skip
    data, tok = corpus.dataset, corpus.tokenizer
    pairs = []
    for pid, entry in prompts.items():
        prefix = entry["prefix"]
        for j in range(samples):
            if (pid, j) not in drawn:
                continue
            tokens, finish = drawn[pid, j]
            for i in entry["examples"]:
                chosen = data[i]
                if list(chosen["input_ids"][len(prefix) :]) == tokens:
                    continue  # the proxy sampled the teacher's own response: no preference to learn
                pairs.append({
                    "prompt_id": pid, "index": chosen["index"], "sample": j,
                    "chosen_ids": list(chosen["input_ids"]), "chosen_labels": list(chosen["labels"]),
                    "rejected_ids": prefix + tokens, "rejected_labels": [IGNORE_INDEX] * len(prefix) + tokens,
                    "rejected_text": tok.decode(tokens, skip_special_tokens=True), "rejected_finish": finish,
                })  # fmt: skip
    return pairs


@dataclass
class PairCollator:
    """Preference pairs -> one batch of 2P sequences: rows 0..P-1 the chosen, P..2P-1 the rejected.

    Fields: those of `data.Collator` (input_ids, labels, attention_mask, index), `loss_units` (P:
    the training loop counts pairs, not tokens) and, when the pairs carry them, `ref_logps` [2P]
    (the reference's sequence log-probabilities of the same rows).
    """

    pad_token_id: int

    def __call__(self, pairs: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": p[f"{side}_ids"], "labels": p[f"{side}_labels"], "index": p["index"]}
                for side in ("chosen", "rejected") for p in pairs]  # fmt: skip
        batch = Collator(self.pad_token_id)(rows)
        batch["loss_units"] = torch.tensor(len(pairs))
        if "ref_chosen" in pairs[0]:
            batch["ref_logps"] = torch.tensor([p["ref_chosen"] for p in pairs] + [p["ref_rejected"] for p in pairs],
                                              dtype=torch.float64)  # fmt: skip
        return batch


@torch.inference_mode()
def score_reference(model: Any, pairs: list[dict], pad_token_id: int, batch_size: int) -> list[dict]:
    """The pairs with `ref_chosen` and `ref_rejected`: the (frozen) model's sequence log-probabilities."""
    collate = PairCollator(pad_token_id)
    out = []
    for lo in tqdm(range(0, len(pairs), batch_size), desc="proxy: dpo reference", unit="batch", dynamic_ncols=True):
        chunk = pairs[lo : lo + batch_size]
        batch = collate(chunk)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logps = sequence_logprobs(logits, batch["labels"]).double().tolist()
        out += [{**p, "ref_chosen": logps[k], "ref_rejected": logps[len(chunk) + k]} for k, p in enumerate(chunk)]
    return out


# ---------------------------------------------------------------- preference (DPO)


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log pi(y | x) per row: the sum of the response tokens' log-probabilities.

    logits [B, T, V] straight from the model; labels [B, T] aligned with input_ids (-100: no
    target); the causal shift happens here, as in `objective`. Returns [B].
    """
    return -cross_entropy(logits, _shift(labels, IGNORE_INDEX)).sum(-1)


def dpo_loss(
    chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023) per pair, from sequence log-probabilities, all [P]:

        L = -log sigmoid(beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

    with y_w the preferred (chosen) response and y_l the other. Returns (L [P], the chosen's
    implicit reward beta (log pi - log pi_ref)(y_w) [P], the rejected's [P]).
    """
    r_w = beta * (chosen - ref_chosen.to(chosen.dtype))
    r_l = beta * (rejected - ref_rejected.to(rejected.dtype))
    return -F.logsigmoid(r_w - r_l), r_w, r_l


def make_dpo_loss_fn(beta: float) -> Callable[[Tensor, Mapping[str, Tensor]], LossOutput]:
    """The training loop's `loss_fn` for DPO over a batch of `preference.PairCollator`.

    Rows 0..P-1 of the batch are the chosen responses, rows P..2P-1 the rejected ones of the
    same pairs; `ref_logps` [2P] are the frozen reference's sequence log-probabilities of the
    same rows. The loss is the SUM over pairs, and `loss_units` tells the loop to count pairs,
    not tokens. Parts: `dpo`, the rewards' `margin` and `accuracy` (chosen reward above the
    rejected), `chosen_reward` and `rejected_reward` (whether the teacher's responses became
    likelier, or only the proxy's own less likely), summed over pairs (the log shows their means).
    """

    def loss_fn(logits: Tensor, batch: Mapping[str, Tensor]) -> LossOutput:
        logps = sequence_logprobs(logits, batch["labels"])
        pairs = logps.shape[0] // 2
        ref = batch["ref_logps"]
        loss, r_w, r_l = dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta)
        total = loss.sum()
        margin = (r_w - r_l).detach()
        parts = {"dpo": total.detach(), "margin": margin.sum(), "accuracy": (margin > 0).float().sum(),
                 "chosen_reward": r_w.detach().sum(), "rejected_reward": r_l.detach().sum()}
        return LossOutput(total, torch.tensor(pairs), parts)

    return loss_fn
