"""A local Hugging Face causal LM behind the black-box teacher interface.

It answers exactly what an OpenAI-style API answers: text, finish reason, usage, and per
generated token its string, its logprob and the top-k alternatives as strings. Logprobs are
those of the model's raw distribution (before temperature and top-p), as vLLM reports them.

Requests with the same sampling parameters are generated together in batches. A batch is
seeded from its requests' seeds, so the same requests in the same batches replay exactly;
one request's seed does not pin its sample independently of its batch-mates.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import torch

from bayeskd.models import load_causal_lm, load_tokenizer
from bayeskd.teachers.base import (
    Choice,
    Teacher,
    TeacherError,
    TeacherRequest,
    TeacherResponse,
    TokenLogprob,
    Usage,
    content_key,
)


class LocalTeacher(Teacher):
    supports_prefix = True

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 16,
        name: str | None = None,
    ):
        self.name = name or f"local:{model}"
        self.model_ref = model
        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "left"
        self.model = load_causal_lm(model, dtype=dtype, device=device)
        self.device = device
        self.batch_size = batch_size
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self._lock = threading.Lock()  # one generate at a time: the server calls from threads

    # ------------------------------------------------------------------ interface

    def stream(self, requests: Iterable[TeacherRequest]) -> Iterator[tuple[int, TeacherResponse | TeacherError]]:
        pending: list[tuple[int, TeacherRequest]] = []
        for index, request in enumerate(requests):
            pending.append((index, request))
            if len(pending) >= self.batch_size:
                yield from zip((i for i, _ in pending), self.generate_batch([r for _, r in pending]))
                pending = []
        if pending:
            yield from zip((i for i, _ in pending), self.generate_batch([r for _, r in pending]))

    def generate_batch(self, requests: list[TeacherRequest]) -> list[TeacherResponse | TeacherError]:
        """Generate for many requests; requests with equal sampling parameters share a forward pass."""
        results: list[TeacherResponse | TeacherError | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            results[i] = self._too_long(r)
            if results[i] is not None:  # refused alone, so that it does not fail its batch-mates
                continue
            params = r.sampling() | {"seed": None}
            groups.setdefault(content_key(params), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                try:
                    outs = self._generate_group([requests[i] for i in chunk])
                except TeacherError as e:
                    outs = [e] * len(chunk)
                for i, out in zip(chunk, outs):
                    results[i] = out
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals

    def prompt_text(self, request: TeacherRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        text = self.tokenizer.apply_chat_template(request.message_dicts(), tokenize=False, add_generation_prompt=True)
        return text + (request.prefix or "")

    def _too_long(self, request: TeacherRequest) -> TeacherError | None:
        if self.context_length is None:
            return None
        n = len(self.tokenizer(self.prompt_text(request), add_special_tokens=False)["input_ids"])
        if n + request.max_tokens <= self.context_length:
            return None
        return TeacherError(
            f"prompt of {n} tokens + max_tokens {request.max_tokens} exceeds the model context of "
            f"{self.context_length} tokens",
            status=400,
        )

    def _generate_group(self, requests: list[TeacherRequest]) -> list[TeacherResponse | TeacherError]:
        first = requests[0]
        if first.max_tokens == 1 and not first.stop:
            return self._one_token_group(requests)
        texts = [self.prompt_text(r) for r in requests]
        rows = [i for i, r in enumerate(requests) for _ in range(r.n)]
        enc = self.tokenizer([texts[i] for i in rows], add_special_tokens=False, padding=True, return_tensors="pt")
        prompt_lens = enc["attention_mask"].sum(1).tolist()
        seeds = [r.seed for r in requests if r.seed is not None]
        generator_seed = int(content_key(seeds), 16) % (2**63) if seeds else None
        kwargs = dict(
            max_new_tokens=first.max_tokens,
            do_sample=first.temperature > 0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True,
            output_logits=first.top_logprobs > 0,
        )
        if first.temperature > 0:
            # top_k=0: OpenAI-style APIs have no top-k filter, so neither does this stand-in.
            kwargs.update(temperature=first.temperature, top_p=first.top_p, top_k=0)
        if first.stop:
            kwargs.update(stop_strings=list(first.stop), tokenizer=self.tokenizer)
        with self._lock, torch.inference_mode():
            if generator_seed is not None:
                torch.manual_seed(generator_seed)
            out = self.model.generate(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
                **kwargs,
            )
        new = out.sequences[:, enc["input_ids"].shape[1] :].cpu()
        logprobs = None
        if first.top_logprobs > 0:
            logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1).cpu()  # [rows, steps, V]
        choices = [self._choice(new[j], None if logprobs is None else logprobs[j], first) for j in range(len(rows))]
        responses = []
        for i, r in enumerate(requests):
            mine = [choices[j] for j, row in enumerate(rows) if row == i]
            usage = Usage(
                prompt_tokens=int(prompt_lens[rows.index(i)]),
                completion_tokens=sum(n for _, n in mine),
            )
            responses.append(TeacherResponse(choices=[c for c, _ in mine], usage=usage, model=self.name))
        return responses

    def _one_token_group(self, requests: list[TeacherRequest]) -> list[TeacherResponse]:
        """max_tokens = 1 (prefix probes): one forward per prompt, n samples from its next-token distribution.

        The same distribution `generate` samples from (temperature, then top-p, no top-k), without
        repeating the prompt n times.
        """
        enc = self.tokenizer([self.prompt_text(r) for r in requests], add_special_tokens=False, padding=True, return_tensors="pt")
        seeds = [r.seed for r in requests if r.seed is not None]
        gen = torch.Generator().manual_seed(int(content_key(seeds), 16) % (2**63)) if seeds else None
        mask = enc["attention_mask"]
        positions = (mask.cumsum(1) - 1).clamp_min(0)  # as generate() numbers left-padded rows
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=enc["input_ids"].to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device)).logits  # fmt: skip
        logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()  # left padding: the last column is the next token
        responses = []
        for i, r in enumerate(requests):
            if r.temperature == 0:
                ids = logprobs[i].argmax().repeat(r.n)
            else:
                probs = torch.softmax(logprobs[i] / r.temperature, dim=-1)
                if r.top_p < 1:
                    sorted_p, order = probs.sort(descending=True)
                    drop = sorted_p.cumsum(0) - sorted_p >= r.top_p  # keep the smallest set reaching top_p
                    probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
                ids = torch.multinomial(probs, r.n, replacement=True, generator=gen)
            chosen = [self._choice(ids[j : j + 1], logprobs[i : i + 1] if r.top_logprobs else None, r) for j in range(r.n)]
            usage = Usage(prompt_tokens=int(mask[i].sum()), completion_tokens=sum(n for _, n in chosen))
            responses.append(TeacherResponse(choices=[c for c, _ in chosen], usage=usage, model=self.name))
        return responses

    def _choice(self, ids: torch.Tensor, logprobs: torch.Tensor | None, request: TeacherRequest) -> tuple[Choice, int]:
        """One sampled row -> (Choice, completion tokens). The EOS token counts as generated, as in APIs."""
        eos = self.tokenizer.eos_token_id
        hits = (ids == eos).nonzero()
        n_tokens = int(hits[0, 0]) + 1 if len(hits) else len(ids)
        finish = "stop" if len(hits) else "length"
        body = ids[: n_tokens - 1] if len(hits) else ids
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        for s in request.stop:  # APIs leave the stop sequence out of the text
            cut = text.find(s)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        tokens = None
        if logprobs is not None:
            k = request.top_logprobs
            top_lp, top_ids = logprobs[:n_tokens].topk(k, dim=-1)
            chosen = logprobs[torch.arange(n_tokens), ids[:n_tokens]]
            tokens = [
                TokenLogprob(
                    token=self._token_str(int(ids[t])),
                    logprob=float(chosen[t]),
                    top=[(self._token_str(int(w)), float(lp)) for w, lp in zip(top_ids[t], top_lp[t])],
                )
                for t in range(n_tokens)
            ]
        return Choice(text=text, finish_reason=finish, tokens=tokens), n_tokens

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
