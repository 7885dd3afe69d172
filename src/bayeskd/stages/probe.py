"""Stage `probe`: the teacher's own next-token samples at response prefixes, spent where they pay
(method.md, section 2, "teacher continued sampling").

A prefix query asks the teacher to continue a training response's prefix (x, y_<t): one
request, `probe.samples` samples of `probe.max_tokens` tokens. The first student token of each
continuation (the end of the turn when the teacher stops at once) is a count c_T at position
t, and the posterior there becomes

    p_post = (kappa_t p_prior + M p_P + c_T) / (kappa_t + M + n_T)

after which the teacher's top-k logprobs, where collect stored them, fix their tokens as in
`posterior`. Positions that share their prompt and prefix (several samples of one prompt
begin alike) share their queries.

Which positions (`probe.strategy`):
- `active`: for Dir(A p), A = kappa + M + n_T, the posterior's total variance is
  sum_w Var p_w = (1 - sum_w p_w^2) / (A + 1); S more samples bring it to
  (1 - sum p^2) / (A + S + 1). Scaled by the square of the mass the teacher's logprobs left
  uncovered there, and divided by the query's cost in tokens (prompt, prefix, completion),
  this is the expected reduction per API token. Each round queries the `round_size` best
  positions, updates them, and scores again.
- `random`: positions in a uniformly random order (the baseline).
- `whole`: more whole responses to the training prompts (random prompts), each counted at
  every corpus position whose prefix it shares (a sample agrees with y_<t, so its token at t
  is a teacher sample at that prefix). A teacher that cannot continue a prefix
  (`teacher.prefix_via: none`) falls back to this, and says so.

Budget: `probe.budget_tokens` API tokens, counted by a ledger and reserved before each request
is sent (a prompt is bounded by its UTF-8 bytes, as in collect), so that the stage stops
within it. Every answer is kept in a content-keyed store (`probe/store`): a rerun, or a larger
budget later, pays for no query twice.

Prefixes are continued through the completions endpoint (messages formatted with
`teacher.completion_template`) where collect used chat: before the first query, one prompt is
sent both ways, and the stage refuses when the server counts different prompt tokens (its chat
template is not that one, e.g. llama-cpp-python's adds an empty system turn).

Writes `probe/targets/` (the posterior's target store with the probed positions updated; the
`bayes` and `posterior-only` students train on it), `probe/trace.jsonl` (tokens spent and
positions probed after each round), `probe/ledger.json` and `probe/failures.jsonl` (queries
that failed after the client's retries and that no later round answered, with the reason).
With failures the stage ends `partial`, and a rerun asks them again.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from bayeskd.estimate import blackbox, ngram
from bayeskd.estimate.prior import NGramPrior
from bayeskd.estimate import distributions as D
from bayeskd.artifacts import Run, write_json_atomic, write_jsonl_atomic
from bayeskd.config import Config
from bayeskd.corpus import TokenizedCorpus, load_corpus
from bayeskd.data import tokenize_record
from bayeskd.estimate.distributions import PAD
from bayeskd.estimate.update import (
    TARGET_SETS,
    estimate,
    evidence_top,
    load_prior,
    proxy_strength,
    response_spans,
    sampling_of,
)
from bayeskd.estimate.evidence import EvidenceMapper
from bayeskd.teachers.store import Budget, Ledger, ResponseStore
from bayeskd.estimate.targets import TargetStore, TargetWriter
from bayeskd.teachers.build import build_teacher
from bayeskd.teachers.base import TeacherRequest, TeacherResponse, content_key
from bayeskd.teachers.cached import Ask, CachedTeacher, unanswered
from bayeskd.teachers.check import same_prompt

FAILURES = "failures.jsonl"
FALLBACK = (
    "teacher {name} cannot continue a response prefix (teacher.prefix_via={via}); probe falls back to "
    "whole-response sampling: {samples} more responses per query, counted where they share a prefix"
)


class Prober:
    """Per-position posterior targets, teacher counts and acquisition scores over a corpus."""

    def __init__(self, cfg: Config, corpus: TokenizedCorpus, prior: NGramPrior, proxy, targets: TargetStore,
                 teacher_name: str):  # fmt: skip
        self.cfg, self.corpus, self.prior, self.proxy, self.teacher_name = cfg, corpus, prior, proxy, teacher_name
        self.extra = (cfg.teacher.extra_body,) if cfg.teacher.extra_body else ()  # the server's own sampling keys answers too
        p = cfg.probe
        data = corpus.dataset
        self.tok = corpus.tokenizer
        self.vocab = len(self.tok)
        self.contexts, self.tokens = ngram.corpus_contexts(corpus.docs(data), prior.order, self.vocab)
        n_resp = np.asarray(data["n_response"])
        self.starts = np.concatenate([[0], np.cumsum(n_resp)])
        self.row_of = np.repeat(np.arange(len(data)), n_resp)
        self.t_of = np.arange(len(self.tokens)) - self.starts[self.row_of]
        self.prompt_ids = list(data["prompt_id"])
        self.record_of = list(data["index"])
        row_train = np.array([corpus.split_of(pid) == "train" for pid in self.prompt_ids])
        self.train = row_train[self.row_of]
        self.loo = cfg.prior.leave_one_out
        self.kappa = np.zeros(len(self.tokens))
        if self.train.any():
            ctx, y = self.contexts[self.train], self.tokens[self.train]
            self.kappa[self.train] = prior.query(ctx, 1, targets=y if self.loo else None).kappa
        self.m = proxy_strength(cfg.posterior)
        ids, probs, tail, ent = [], [], [], []
        for r in range(len(data)):
            rec = self.record_of[r]
            ids.append(targets.rows(rec, "posterior_ids")[: n_resp[r]])
            probs.append(targets.rows(rec, "posterior_probs")[: n_resp[r]].astype(np.float64))
            tail.append(targets.rows(rec, "posterior_tail")[: n_resp[r]].astype(np.float64))
            ent.append(targets.rows(rec, "entropy")[: n_resp[r]].astype(np.float64))
        self.post_ids, self.post_probs = np.concatenate(ids), np.concatenate(probs)
        self.post_tail, self.entropy = np.concatenate(tail), np.concatenate(ent)
        self.entropy_before = self.entropy.copy()
        self.mapper = EvidenceMapper(self.tok)
        self._spans: dict[int, list] = {}
        self._evidence: dict[int, tuple | None] = {}
        self.uncovered = np.ones(len(self.tokens))
        for r in np.unique(self.row_of[self.train]):
            ev = self.evidence(int(r))
            if ev is not None:
                self.uncovered[self.starts[r] : self.starts[r + 1]] = np.clip(1 - ev[1].sum(1), 0, 1)
        self.prompt_len = np.array([len(a) - n for a, n in zip(data["input_ids"], n_resp)])
        self.counts: dict[int, Counter] = {}
        self.uncounted = 0  # samples whose first student token at their position is not settled (or not there)
        self.n_t = np.zeros(len(self.tokens))
        self.n_queries = np.zeros(len(self.tokens), dtype=np.int64)
        self.rng = np.random.default_rng(p.seed)
        self.order = self.rng.permutation(np.flatnonzero(self.train))  # `random`'s positions
        self.next_random = 0
        self.generator = torch.Generator().manual_seed(cfg.posterior.seed)

    # ---------------------------------------------------------------- per row

    def record(self, r: int) -> dict:
        return self.corpus.records[self.record_of[r]]

    def spans(self, r: int) -> list:
        if r not in self._spans:
            n = int(self.starts[r + 1] - self.starts[r])
            self._spans[r] = response_spans(self.record(r), self.tok, self.cfg.data.template, n)
        return self._spans[r]

    def evidence(self, r: int):
        if r not in self._evidence:
            rec = self.record(r)
            top = evidence_top(self.cfg)
            ok = self.cfg.posterior.use_logprobs and rec.get("tokens") and top != 0
            ended = rec.get("finish_reason") == "stop"
            self._evidence[r] = (self.mapper.evidence(rec["text"], rec["tokens"], self.spans(r), top=top, ended=ended)
                                 if ok else None)  # fmt: skip
        return self._evidence[r]

    def prefix(self, g: int) -> str:
        """What the teacher is asked to continue for position g: the response before it, cut back to
        the start of its word when `probe.max_tokens` > 1 (see `absorb_prefix`)."""
        r, t = int(self.row_of[g]), int(self.t_of[g])
        text, a = self.record(r)["text"], max(0, self.spans(r)[t][0])
        if self.cfg.probe.max_tokens > 1:
            a = self.mapper.word_start(text, a)
        return text[:a]

    # ---------------------------------------------------------------- choosing

    def scores(self) -> np.ndarray:
        """Expected reduction of the posterior's total variance per API token, per position."""
        p = self.cfg.probe
        a = self.kappa + self.m + self.n_t
        spread = 1.0 - (self.post_probs**2).sum(1)
        gain = spread * self.uncovered**2 * (1.0 / (a + 1.0) - 1.0 / (a + p.samples + 1.0))
        cost = self.prompt_len[self.row_of] + self.t_of + p.samples * p.max_tokens
        score = gain / cost
        score[~self.train | (self.n_queries >= p.max_queries_per_position)] = -np.inf
        return score

    def select(self, strategy: str, k: int) -> np.ndarray:
        if strategy == "random":
            picked = self.order[self.next_random : self.next_random + k]
            self.next_random += len(picked)
            return picked
        score = self.scores()
        k = min(k, int(np.isfinite(score).sum()))
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        top = np.argpartition(-score, k - 1)[:k]
        return top[np.argsort(-score[top])]

    # ---------------------------------------------------------------- asking

    def prefix_request(self, g: int) -> Ask:
        p, c = self.cfg.probe, self.cfg.collect
        messages, prefix = self.record(int(self.row_of[g]))["messages"], self.prefix(g)
        key = content_key(self.teacher_name, messages, prefix, p.samples, p.max_tokens, c.temperature, c.top_p,
                          int(self.n_queries[g]), *self.extra)  # fmt: skip
        request = TeacherRequest.chat(messages, prefix=prefix, n=p.samples, max_tokens=p.max_tokens,
                                      temperature=c.temperature, top_p=c.top_p, seed=_seed(key, p.seed))  # fmt: skip
        return Ask(request, (key,), {"prompt_id": self.prompt_ids[int(self.row_of[g])], "prefix": prefix})

    def whole_request(self, prompt_id: str, q: int) -> Ask:
        p, c = self.cfg.probe, self.cfg.collect
        messages = self.record(self.prompt_ids.index(prompt_id))["messages"]
        key = content_key(self.teacher_name, messages, "whole", p.samples, c.max_tokens, c.temperature, c.top_p, q, *self.extra)
        request = TeacherRequest.chat(messages, n=p.samples, max_tokens=c.max_tokens, temperature=c.temperature,
                                      top_p=c.top_p, seed=_seed(key, p.seed))  # fmt: skip
        return Ask(request, (key,), {"prompt_id": prompt_id})

    def student_token(self, text: str, finish: str) -> int:
        """The first student token of a one-token continuation; the end of the turn when it stopped at once."""
        if text:
            return self.mapper.student_first(text)[0]
        return self.tok.eos_token_id if finish == "stop" else PAD

    def continued_token(self, g: int, asked: str, text: str, finish: str) -> int:
        """The first student token at position g of a continuation of `asked` (a prefix of g's own).

        The teacher was asked from the start of g's word, so that its prefix does not end inside one
        of its tokens (where its next-token distribution is not the text's); a sample that does not
        rewrite the realised text up to g is not a sample at g and is left out (rejection: the kept
        ones are draws from the teacher's distribution given the whole prefix). The student token
        after the prefix is counted once it is settled (`EvidenceMapper.first_after`)."""
        r, t = int(self.row_of[g]), int(self.t_of[g])
        realised = self.record(r)["text"]
        a = max(0, self.spans(r)[t][0])
        bridge = realised[len(asked) : a]
        if not text.startswith(bridge):
            return PAD
        rest = text[len(bridge) :]
        if not rest:
            return self.tok.eos_token_id if finish == "stop" else PAD
        return self.mapper.first_after(realised[:a], rest, finish == "stop")

    def absorb_prefix(self, g: int, samples: list[dict]) -> list[int]:
        if self.cfg.probe.max_tokens > 1:
            asked = self.prefix(g)
            ids = [self.continued_token(g, asked, s["text"], s["finish_reason"]) for s in samples]
        else:
            ids = [self.student_token(s["text"], s["finish_reason"]) for s in samples]
        self.uncounted += sum(i == PAD for i in ids)
        self._count(g, [i for i in ids if i != PAD])
        self.n_queries[g] += 1
        return [g]

    def absorb_whole(self, prompt_id: str, samples: list[dict]) -> list[int]:
        """Count each whole sample at every position of the prompt's training responses it shares a prefix with."""
        touched = set()
        rows = [r for r, pid in enumerate(self.prompt_ids) if pid == prompt_id]
        for s in samples:
            rec = {"messages": self.record(rows[0])["messages"], "text": s["text"], "finish_reason": s["finish_reason"]}
            ex = tokenize_record(rec, self.tok, self.cfg.data.template, self.cfg.data.max_length)
            z = ex["input_ids"][len(ex["input_ids"]) - ex["n_response"] :]
            for r in rows:
                lo, hi = int(self.starts[r]), int(self.starts[r + 1])
                for t in range(min(hi - lo, len(z))):  # z agrees with y up to t - 1: z_t is a sample at y_<t
                    self._count(lo + t, [int(z[t])])
                    touched.add(lo + t)
                    if z[t] != self.tokens[lo + t]:
                        break
        return sorted(touched)

    def _count(self, g: int, ids: list[int]) -> None:
        self.counts.setdefault(g, Counter()).update(ids)
        self.n_t[g] = sum(self.counts[g].values())

    # ---------------------------------------------------------------- updating

    def update(self, positions: list[int]) -> None:
        """Recompute the posterior at `positions` with their teacher counts (one proxy pass per row)."""
        positions = np.unique(np.asarray(positions, dtype=np.int64))
        rows = np.unique(self.row_of[positions])
        bs = self.cfg.posterior.batch_size
        for lo in range(0, len(rows), bs):
            rb = self.corpus.batch(rows[lo : lo + bs])
            for r, logits in zip(rows[lo : lo + bs], rb.logits(self.proxy)):
                mine = positions[self.row_of[positions] == r]
                t = self.t_of[mine]
                z = logits[torch.from_numpy(t)]
                ev = self.evidence(int(r))
                ev = None if ev is None else (ev[0][t], ev[1][t])
                width = max(len(self.counts.get(int(g), ())) for g in mine) or 1
                c_ids = np.full((len(mine), width), PAD, dtype=np.int64)
                c_n = np.zeros((len(mine), width))
                for i, g in enumerate(mine):
                    for j, (w, n) in enumerate(self.counts.get(int(g), Counter()).items()):
                        c_ids[i, j], c_n[i, j] = w, n
                loo = self.tokens[mine] if self.loo else None
                dists, ent = estimate(self.prior, self.contexts[mine], loo, z, self.cfg.posterior, self.cfg.prior.top_k,
                                      ev, self.generator, teacher_counts=(c_ids, c_n), sampling=sampling_of(self.cfg))  # fmt: skip
                post = dists["posterior"]
                self.post_ids[mine], self.post_probs[mine], self.post_tail[mine] = post.ids, post.probs, post.tail
                self.entropy[mine] = ent

    # ---------------------------------------------------------------- writing

    def write(self, folder, source: TargetStore) -> None:
        k = self.cfg.posterior.top_k
        writer = TargetWriter(folder, TARGET_SETS, k)
        for r in range(len(self.corpus.dataset)):
            rec, sl = self.record_of[r], slice(int(self.starts[r]), int(self.starts[r + 1]))
            n = sl.stop - sl.start
            dists = {
                name: D.SparseDist(source.rows(rec, f"{name}_ids")[:n], source.rows(rec, f"{name}_probs")[:n].astype(np.float64),
                                   source.rows(rec, f"{name}_tail")[:n].astype(np.float64))
                for name in TARGET_SETS if name != "posterior"
            }  # fmt: skip
            dists["posterior"] = D.SparseDist(self.post_ids[sl], self.post_probs[sl], self.post_tail[sl])
            writer.add(rec, dists, self.entropy[sl])
        writer.close({**source.meta, "probe": {"strategy": self.cfg.probe.strategy, "positions": int((self.n_t > 0).sum())}})


def _seed(key: str, seed: int) -> int:
    return (int(key, 16) + seed) % 2**31


def _bodies(_job: object, request: TeacherRequest, response: TeacherResponse) -> list[dict]:
    """A probe answer is one record: what was asked and every sample's text."""
    samples = [{"text": ch.text, "finish_reason": ch.finish_reason} for ch in response.choices]
    return [{"messages": request.message_dicts(), "prefix": request.prefix, "samples": samples}]


def probe(prober: Prober, teacher: CachedTeacher, strategy: str, on_round: Callable[[dict], None] | None = None,
          progress: bool = True) -> dict:  # fmt: skip
    """Query in rounds until the budget or the candidates run out; returns the trace of the rounds."""
    p = prober.cfg.probe
    budget = teacher.budget
    trace: list[dict] = []
    whole_q: Counter = Counter()
    train_prompts = sorted({prober.prompt_ids[r] for r in np.unique(prober.row_of[prober.train])})
    prompt_order = list(prober.rng.permutation(train_prompts)) if train_prompts else []
    bar = tqdm(total=budget.budget_tokens, desc=f"probe ({strategy})", unit="tok", dynamic_ncols=True, disable=not progress)
    queries = 0
    while not budget.reached:
        if strategy == "whole":
            if not prompt_order:
                break
            picked = [prompt_order[(len(trace) * p.round_size + i) % len(prompt_order)] for i in range(p.round_size)]
            jobs = []
            for pid in picked:
                jobs.append((pid, prober.whole_request(pid, whole_q[pid])))
                whole_q[pid] += 1
            absorb = prober.absorb_whole
        else:
            picked = prober.select(strategy, p.round_size)
            if len(picked) == 0:
                break
            jobs = [(int(g), prober.prefix_request(int(g))) for g in picked]
            absorb = prober.absorb_prefix
        touched: list[int] = []
        answered = 0
        for job, records in teacher.ask(jobs, _bodies):
            touched += absorb(job, records[0]["samples"])
            answered += 1
        queries += answered
        if touched:
            prober.update(touched)
        entry = {"round": len(trace) + 1, "tokens": budget.ledger.tokens, "queries": queries,
                 "positions": int((prober.n_t > 0).sum()), "samples": int(prober.n_t.sum())}  # fmt: skip
        trace.append(entry)
        bar.n = min(budget.ledger.tokens, budget.budget_tokens or budget.ledger.tokens)
        bar.set_postfix(positions=entry["positions"], refresh=True)
        if on_round is not None:
            on_round(entry)
        if answered == 0:
            break  # every request failed or the budget allows none: nothing more will happen
    bar.close()
    return {"trace": trace}


def run_probe(cfg: Config, run: Run, force: bool = False) -> dict | None:
    p = cfg.probe
    if p.budget_tokens is None:
        return {"off": "probe.budget_tokens is not set; the students train on posterior/targets"}
    corpus = load_corpus(cfg, run)
    source = TargetStore.open(run.output("posterior", "targets"))
    source.check(corpus.tokenizer_fp, corpus.corpus_fp)
    stage_cfg = {"probe": asdict(p), "posterior": cfg.posterior.identity(), "sampling": asdict(cfg.collect)}
    inputs = {"corpus": corpus.corpus_fp, "posterior": (run.manifest("posterior") or {}).get("fingerprint", ""),
              "teacher": cfg.teacher.key_name}  # fmt: skip
    if cfg.teacher.extra_body:  # only when set, so that runs from before the option keep their fingerprint
        stage_cfg["extra_body"] = cfg.teacher.extra_body
    out = run.begin("probe", stage_cfg, inputs, force, keep_outputs=True)  # the store survives: nothing is paid twice
    if out is None:
        return None
    from bayeskd.models import load_causal_lm
    from bayeskd.stages import proxy_model

    cfg = blackbox.effective(cfg, run)  # the posterior's fitted values, when posterior.fit chose them
    prober = Prober(cfg, corpus, load_prior(cfg, run), load_causal_lm(str(proxy_model(cfg, run))), source,
                    cfg.teacher.key_name)  # fmt: skip
    store = ResponseStore(out / "store", flush_every=cfg.collect.flush_every)
    budget = Budget(Ledger(price=cfg.collect.price), p.budget_tokens)  # what this run spends, replayed answers included
    teacher = CachedTeacher(build_teacher(cfg.teacher), store, budget, cfg.teacher.key_name)
    strategy, fallback = p.strategy, False
    if strategy != "whole" and not teacher.teacher.supports_prefix:
        print(FALLBACK.format(name=cfg.teacher.key_name, via=cfg.teacher.prefix_via, samples=p.samples))
        strategy, fallback = "whole", True
    try:
        if strategy != "whole":
            same_prompt(cfg, prober.record(0)["messages"], teacher, "probe")
        result = probe(prober, teacher, strategy)
    finally:
        store.close()
        teacher.close()
        write_json_atomic(out / "ledger.json", budget.ledger.to_dict())
        failures = unanswered(teacher.failures, store)
        write_jsonl_atomic(out / FAILURES, failures)
    if failures:
        print(f"probe: {len(failures)} queries failed, e.g. {failures[0]['reason']}; all are listed in "
              f"{out / FAILURES}, and a rerun asks them again", file=sys.stderr)  # fmt: skip
    with open(out / "trace.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in result["trace"])
    prober.write(out / "targets", source)
    train = prober.train
    summary = {
        "strategy": strategy,
        "fallback_to_whole": fallback,
        "tokens": budget.ledger.tokens,
        "budget_tokens": p.budget_tokens,
        "budget_reached": budget.reached,
        "queries": result["trace"][-1]["queries"] if result["trace"] else 0,
        "failures": len(failures),
        "retries": teacher.stats["retries"],
        "positions_probed": int((prober.n_t > 0).sum()),
        "share_of_training_positions": float((prober.n_t[train] > 0).mean()) if train.any() else 0.0,
        "teacher_samples": int(prober.n_t.sum()),
        "samples_not_counted": int(prober.uncounted),
        "mean_entropy_before": float(prober.entropy_before[train].mean()) if train.any() else 0.0,
        "mean_entropy_after": float(prober.entropy[train].mean()) if train.any() else 0.0,
    }
    run.finish("probe", "partial" if failures else "done", summary, {"targets": corpus.tokenizer_fp})
    return summary
