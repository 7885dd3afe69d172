"""A local Hugging Face causal LM behind the black-box teacher interface.

It answers exactly what an OpenAI-style API answers: text, finish reason, usage, and per
generated token its string, its logprob and the top-k alternatives as strings. Logprobs are
those of the model's raw distribution (before temperature and top-p), as vLLM reports them.

Generation is continuous batching (`decoding.Decoder`) in one background thread: each sample
is a row with its own sampling parameters; rows finish independently and free slots are
refilled from waiting requests, so concurrent requests with different parameters share
forward passes. Seeding is per row: sample i of a request with seed s draws from a generator
seeded by (s, i), so a seeded request's samples are the same whatever its batch-mates are. A
request without a seed gets one from torch's global generator when it is submitted.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

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
from bayeskd.teachers.decoding import Decoder, Row

Result = TeacherResponse | TeacherError


@dataclass(eq=False)
class _Job:
    request: TeacherRequest
    prompt: list[int]
    done: Callable[[Result], None]
    rows: list[Row] = field(default_factory=list)
    left: int = 0


class LocalTeacher(Teacher):
    supports_prefix = True

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 64,
        name: str | None = None,
    ):
        self.name = name or f"local:{model}"
        self.model_ref = model
        self.tokenizer = load_tokenizer(model)
        self.model = load_causal_lm(model, dtype=dtype, device=device).eval()
        self.device = device
        self.batch_size = batch_size
        """Rows (samples) decoded together; stream() and the server keep about this many in flight."""
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        tok = self.tokenizer
        self.decoder = Decoder(self.model, batch_size, tok.eos_token_id, tok.pad_token_id, self._text)
        self._token_strs: dict[int, str] = {}
        self._cond = threading.Condition()
        self._score_lock = threading.Lock()
        self._inbox: list[_Job] = []
        self._in_flight = 0  # rows submitted and not yet finished
        self._worker: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ interface

    def stream(self, requests: Iterable[TeacherRequest]) -> Iterator[tuple[int, Result]]:
        """Pull requests only while fewer than `batch_size` rows are in flight (plus the one that crosses it)."""
        results: queue.SimpleQueue[tuple[int, Result]] = queue.SimpleQueue()
        source = enumerate(requests)
        exhausted, outstanding = False, 0
        while True:
            while not exhausted and self.has_room():
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                i, request = item
                outstanding += 1
                self.submit(request, lambda result, i=i: results.put((i, result)))
            if outstanding == 0:
                return
            yield results.get()
            outstanding -= 1

    def generate_batch(self, requests: list[TeacherRequest]) -> list[Result]:
        """Generate for many requests at once; results in the requests' order."""
        results: dict[int, Result] = dict(self.stream(requests))
        return [results[i] for i in range(len(requests))]

    def has_room(self) -> bool:
        """Whether fewer than `batch_size` rows are in flight: a caller feeding requests lazily checks this."""
        return self._in_flight < self.batch_size

    def submit(self, request: TeacherRequest, done: Callable[[Result], None]) -> None:
        """Queue one request; `done` is called with its result from the decoding thread (or here, if refused)."""
        text = self.prompt_text(request)
        prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        error = self._too_long(len(prompt), request.max_tokens)
        if error is not None:  # refused alone, so that it does not fail its batch-mates
            done(error)
            return
        job = _Job(request, prompt, done, left=request.n)
        seed = request.seed if request.seed is not None else int(torch.randint(2**62, ()))
        for i in range(request.n):
            uniforms = None
            if request.temperature > 0:
                g = torch.Generator().manual_seed(int(content_key(seed, i), 16) % 2**63)
                uniforms = torch.rand(request.max_tokens, generator=g).tolist()
            job.rows.append(Row(key=job, prompt=prompt, temperature=request.temperature, top_p=request.top_p,
                                max_tokens=request.max_tokens, stop=request.stop,
                                top_logprobs=request.top_logprobs, top_k=request.top_k, uniforms=uniforms))  # fmt: skip
        with self._cond:
            if self._closed:
                raise TeacherError("the local teacher is closed")
            self._in_flight += request.n
            self._inbox.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="bayeskd-decoder", daemon=True)
                self._worker.start()
            self._cond.notify()

    def score(self, prompts: list[list[int]], top_logprobs: int) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
        """Prompt logprobs (the completions endpoint's `echo`): per prompt of token ids, the logprob of
        each token after the first given the ones before it, and its `top_logprobs` likeliest
        alternatives as (id, logprob), all of the raw distribution, as generated tokens' are.

        One forward over the prompts, right-padded, beside the decoding thread's (inference only);
        scoring calls are taken one at a time."""
        for p in prompts:
            error = self._too_long(len(p), 0)
            if error is not None:
                raise error
            if not p:
                raise TeacherError("an empty prompt has no tokens to score", status=400)
        out = []
        with self._score_lock, torch.inference_mode():
            width = max(len(p) for p in prompts)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], device=self.device)
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            for b, p in enumerate(prompts):
                logp = torch.log_softmax(logits[b, : len(p) - 1].float(), dim=-1)
                own = logp.gather(1, ids[b, 1 : len(p), None]).squeeze(1).tolist()
                tops: list[list[tuple[int, float]]] = [[] for _ in own]
                if top_logprobs:
                    v, i = logp.topk(min(top_logprobs, logp.shape[-1]), dim=-1)
                    tops = [list(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())]
                out.append((own, tops))
        return out

    def token_str(self, token_id: int) -> str:
        """A token's string as the API shows it (its own decoding)."""
        return self._token_str(token_id)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._worker is not None:
            self._worker.join(timeout=60)
        self.model = None  # type: ignore[assignment]
        self.decoder = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ the decoding thread

    def _work(self) -> None:
        jobs: set[_Job] = set()
        while True:
            with self._cond:
                while not self._inbox and not jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                new, self._inbox = self._inbox, []
            for job in new:
                jobs.add(job)
                self.decoder.add(job.rows)
            try:
                finished = self.decoder.step()
            except Exception as e:  # a crash must fail what is in flight, not hang its callers
                self.decoder = Decoder(self.model, self.batch_size, self.tokenizer.eos_token_id,
                                       self.tokenizer.pad_token_id, self._text)  # fmt: skip
                for job in jobs:
                    self._finish(job, TeacherError(f"generation failed: {e}"))
                jobs.clear()
                continue
            for row in finished:
                job = row.key
                job.left -= 1
                if job.left == 0:
                    jobs.discard(job)
                    self._finish(job, self._response(job))

    def _finish(self, job: _Job, result: Result) -> None:
        with self._cond:
            self._in_flight -= job.request.n
        job.done(result)

    # ------------------------------------------------------------------ requests and responses

    def prompt_text(self, request: TeacherRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        text = self.tokenizer.apply_chat_template(request.message_dicts(), tokenize=False, add_generation_prompt=True)
        return text + (request.prefix or "")

    def _too_long(self, prompt_tokens: int, max_tokens: int) -> TeacherError | None:
        if self.context_length is None or prompt_tokens + max_tokens <= self.context_length:
            return None
        return TeacherError(
            f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds the model context of "
            f"{self.context_length} tokens",
            status=400,
        )

    def _response(self, job: _Job) -> TeacherResponse:
        choices = [self._choice(row) for row in job.rows]
        usage = Usage(prompt_tokens=len(job.prompt), completion_tokens=sum(len(r.tokens) for r in job.rows))
        return TeacherResponse(choices=choices, usage=usage, model=self.name)

    def _choice(self, row: Row) -> Choice:
        """A finished row as the API shows it. The EOS token counts as generated, as in APIs."""
        text, finish = self._text(row.tokens), row.finish or "length"
        for s in row.stop:  # APIs leave the stop sequence out of the text
            cut = text.find(s)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        tokens = None
        if row.top_logprobs:
            tokens = [
                TokenLogprob(
                    token=self._token_str(t),
                    logprob=lp,
                    top=[(self._token_str(w), v) for w, v in zip(ids, lps)],
                )
                for t, (lp, ids, lps) in zip(row.tokens, row.logprobs)
            ]
        return Choice(text=text, finish_reason=finish, tokens=tokens)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self._token_strs[token_id] = self.tokenizer.decode([token_id])
        return s
