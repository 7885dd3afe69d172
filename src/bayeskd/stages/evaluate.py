"""Stage `eval`: the students and the estimates, on held-out prompts (method.md, section 5).

Students (every `distill/<mode>` that is done), on the held-out split's first
`eval.max_examples` examples:
- `bpb`: the teacher's responses' NLL under the student, in bits per UTF-8 byte of the text;
- `rouge_l`: greedy generations against the teacher's responses; `accuracy`: exact match on
  prompts with checkable answers;
- `kl_teacher`: KL(p_T || p_S) per response token, when the teacher can serve as an oracle.

Estimates (oracle only): per-token KL(p_T || p_hat), top-1 agreement and teacher-token NLL for
smoothed one-hot, prior, proxy, the posterior without and with the teacher's logprob evidence,
and the control lambda * one-hot + (1 - lambda) *
proxy (best lambda), in two settings: `train` (training positions; the prior's counts include
the scored sequence, as when the student trains) and `heldout` (their counts are excluded).
All distributions are dense over the vocabulary here, so the numbers are exact.

Writes `eval/metrics.json` and `eval/report.md` with plots.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from bayeskd import distributions as D
from bayeskd import metrics as M
from bayeskd.answers import is_correct
from bayeskd.artifacts import Run, write_json_atomic
from bayeskd.config import Config
from bayeskd.data import Collator
from bayeskd.errors import BayeskdError
from bayeskd.evidence import EvidenceMapper
from bayeskd.models import load_causal_lm
from bayeskd.stages.corpus import TokenizedCorpus, load_corpus
from bayeskd.stages.posterior import load_prior, response_spans

# posterior-no-logprobs: prior and proxy alone, before the teacher's top-k logprobs fix their
# tokens; it isolates what the Bayesian update itself adds.
ESTIMATES = ("one-hot", "prior", "proxy", "posterior-no-logprobs", "posterior", "one-hot+proxy")


def _batches(corpus: TokenizedCorpus, indices: list[int], size: int, desc: str):
    """(rows, batch, label positions per row) over dataset rows."""
    collate = Collator(corpus.tokenizer.pad_token_id)
    for lo in tqdm(range(0, len(indices), size), desc=desc, unit="batch", dynamic_ncols=True):
        rows = [corpus.dataset[i] for i in indices[lo : lo + size]]
        batch = collate(rows)
        pos = [torch.nonzero(batch["labels"][b] != -100).squeeze(-1) for b in range(len(rows))]
        yield rows, batch, pos


def _logits(model, batch, pos) -> list[torch.Tensor]:
    with torch.inference_mode():
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return [z[b, p - 1] for b, p in enumerate(pos)]


def _oracle(cfg: Config, corpus: TokenizedCorpus):
    if not cfg.eval.oracle:
        return None
    from bayeskd.stages.oracle import load_oracle

    try:
        return load_oracle(cfg, corpus.tokenizer_fp)
    except BayeskdError as e:
        print(f"eval: no oracle ({e}); teacher KL and fidelity are skipped")
        return None


def score_students(cfg: Config, corpus: TokenizedCorpus, students: dict, teacher, indices: list[int]) -> dict:
    temp = max(cfg.collect.temperature, 1e-6)
    sums: dict[str, dict] = {m: defaultdict(float) for m in students}
    n_bytes = n_tokens = 0
    for rows, batch, pos in _batches(corpus, indices, cfg.eval.batch_size, "eval: students"):
        labels = [batch["labels"][b, p] for b, p in enumerate(pos)]
        n_bytes += sum(len(corpus.records[r["index"]]["text"].encode()) for r in rows)
        n_tokens += sum(len(x) for x in labels)
        zt = _logits(teacher, batch, pos) if teacher is not None else None
        for mode, model in students.items():
            for b, z in enumerate(_logits(model, batch, pos)):
                sums[mode]["nll"] += float(M.token_nll(z, labels[b]).sum())
                if zt is not None:
                    p_t = torch.softmax(zt[b] / temp, -1)
                    sums[mode]["kl"] += float(M.kl_dense(p_t, torch.softmax(z, -1)).sum())
    out = {}
    for mode, model in students.items():
        gen = _generate(cfg, corpus, model, indices)
        out[mode] = {
            "bpb": M.bits_per_byte(sums[mode]["nll"], n_bytes),
            "nll_per_token": sums[mode]["nll"] / max(n_tokens, 1),
            **({"kl_teacher": sums[mode]["kl"] / max(n_tokens, 1)} if teacher is not None else {}),
            **gen,
            "tokens": n_tokens,
            "prompts": len({corpus.dataset[i]["prompt_id"] for i in indices}),
        }
    return out


def _generate(cfg: Config, corpus: TokenizedCorpus, model, indices: list[int]) -> dict:
    tok = corpus.tokenizer
    side, tok.padding_side = tok.padding_side, "left"  # generation pads on the left; restored below
    try:
        return _generate_left_padded(cfg, corpus, model, indices)
    finally:
        tok.padding_side = side


def _generate_left_padded(cfg: Config, corpus: TokenizedCorpus, model, indices: list[int]) -> dict:
    tok = corpus.tokenizer
    max_new = cfg.eval.max_new_tokens or cfg.collect.max_tokens
    records = [corpus.records[corpus.dataset[i]["index"]] for i in indices]
    seen, unique = set(), []
    for r in records:  # one generation per prompt: greedy decoding is the same for every sample
        if r["prompt_id"] not in seen:
            seen.add(r["prompt_id"])
            unique.append(r)
    rouge, correct, checked = [], 0, 0
    for lo in range(0, len(unique), cfg.eval.batch_size):
        chunk = unique[lo : lo + cfg.eval.batch_size]
        texts = [tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in chunk]
        enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        for r, ids in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
            text = tok.decode(ids, skip_special_tokens=True)
            refs = [x["text"] for x in records if x["prompt_id"] == r["prompt_id"]]
            rouge.append(max(M.rouge_l(text, ref) for ref in refs))
            if r.get("answer"):
                checked += 1
                correct += is_correct(text, str(r["answer"]))
    return {"rouge_l": float(np.mean(rouge)) if rouge else 0.0, "accuracy": correct / checked if checked else None,
            "answer_prompts": checked}


def score_estimates(cfg: Config, run: Run, corpus: TokenizedCorpus, teacher, heldout: bool) -> dict:
    """Fidelity of each estimate to the teacher, dense over the vocabulary, in one setting."""
    prior = load_prior(cfg, run)
    proxy = load_causal_lm(str(run.output("proxy", "final")))
    vocab, p = len(corpus.tokenizer), cfg.posterior
    indices = [i for i, pid in enumerate(corpus.dataset["prompt_id"]) if _heldout(cfg, pid) == heldout]
    from bayeskd import ngram

    mapper = EvidenceMapper(corpus.tokenizer) if p.use_logprobs else None
    acc: dict[str, list] = defaultdict(list)
    lambdas = cfg.eval.control_lambdas
    control = {lam: [] for lam in lambdas}
    positions = 0
    gen = torch.Generator().manual_seed(p.seed)
    for rows, batch, pos in _batches(corpus, indices, cfg.eval.batch_size, f"eval: fidelity ({'heldout' if heldout else 'train'})"):
        if positions >= cfg.eval.fidelity_positions:
            break
        zt, zp = _logits(teacher, batch, pos), _logits(proxy, batch, pos)
        for b, row in enumerate(rows):
            y = batch["labels"][b, pos[b]].numpy()
            ids = np.asarray(row["input_ids"])
            ctx = ngram.contexts(ids[: len(ids) - len(y)], y, prior.order, vocab)
            p_t = torch.softmax(zt[b] / max(cfg.collect.temperature, 1e-6), -1).double().numpy()
            p_proxy = torch.softmax(zp[b] / p.proxy_temperature, -1).double().numpy()
            # As the student sees it: in the train setting the scored sequence's own counts are in
            # the tables (left out when prior.leave_one_out, as the posterior stage did).
            loo = y if (not heldout and cfg.prior.leave_one_out) else None
            p_prior = prior.dense(ctx, targets=loo)
            kappa = prior.query(ctx, 1, targets=loo).kappa
            bare = _dense_posterior(p_prior, p_proxy, kappa, cfg, gen)
            post = bare
            record = corpus.records[row["index"]]
            if mapper is not None and record.get("tokens"):
                ev = mapper.evidence(record["text"], record["tokens"], response_spans(record, corpus.tokenizer, cfg.data.template, len(y)))
                post = D.apply_evidence(bare, np.tile(np.arange(vocab), (len(y), 1)), *ev)
            one_hot = M.smoothed_one_hot(y, vocab, cfg.eval.one_hot_eps)
            estimates = (("one-hot", one_hot), ("prior", p_prior), ("proxy", p_proxy),
                         ("posterior-no-logprobs", bare), ("posterior", post))
            for name, est in estimates:
                for k, v in M.fidelity(p_t, est, y).items():
                    acc[f"{name}/{k}"].append(v)
            acc["position"].append(np.arange(len(y)))
            for lam in lambdas:
                hard = np.zeros_like(p_proxy)
                hard[np.arange(len(y)), y] = 1.0
                control[lam].append(M.fidelity(p_t, lam * hard + (1 - lam) * p_proxy, y))
            positions += len(y)
    if positions == 0:
        return {}
    out = {name: {k: float(np.concatenate(acc[f"{name}/{k}"]).mean()) for k in ("kl", "top1", "nll")}
           for name in ESTIMATES if name != "one-hot+proxy"}
    best = min(lambdas, key=lambda lam: np.concatenate([c["kl"] for c in control[lam]]).mean())
    out["one-hot+proxy"] = {k: float(np.concatenate([c[k] for c in control[best]]).mean()) for k in ("kl", "top1", "nll")}
    out["one-hot+proxy"]["lambda"] = best
    for v in out.values():
        v.update(tokens=positions, prompts=len({corpus.dataset[i]["prompt_id"] for i in indices}))
    out["by_position"] = _by_position(acc)
    out["leave_one_out"] = bool(cfg.prior.leave_one_out and not heldout)
    return out


def _by_position(acc: dict) -> dict:
    """Mean KL(p_T || p_hat) per bucket of response position, for the report's plot."""
    t = np.concatenate(acc["position"])
    edges = [0, 4, 8, 16, 32, 64, 10**9]
    out = {"buckets": [f"{a}-{b - 1}" if b < 10**9 else f"{a}+" for a, b in zip(edges, edges[1:])]}
    for name in ("one-hot", "prior", "proxy", "posterior-no-logprobs", "posterior"):
        kl = np.concatenate(acc[f"{name}/kl"])
        out[name] = [float(kl[(t >= a) & (t < b)].mean()) if ((t >= a) & (t < b)).any() else None
                     for a, b in zip(edges, edges[1:])]
    return out


def _dense_posterior(p_prior, p_proxy, kappa, cfg: Config, gen) -> np.ndarray:
    p = cfg.posterior
    if p.mode == "expected":
        return D.expected(p_prior, p_proxy, kappa, p.m)
    if p.mode == "sampled":
        draws = torch.multinomial(torch.from_numpy(p_proxy), int(p.m), replacement=True, generator=gen) if p.m else None
        counts = np.zeros_like(p_proxy)
        if draws is not None:
            np.add.at(counts, (np.repeat(np.arange(len(p_proxy)), draws.shape[1]), draws.numpy().ravel()), 1)
        return D.sampled(p_prior, counts, kappa, int(p.m))
    zero = np.zeros(len(p_prior))
    return D.product(p_prior, p_proxy, zero, zero, p.a, p.b)


def _heldout(cfg: Config, prompt_id: str) -> bool:
    from bayeskd.data import is_heldout

    return is_heldout(prompt_id, cfg.data.heldout_fraction)


def run_eval(cfg: Config, run: Run, force: bool = False) -> dict | None:
    corpus = load_corpus(cfg, run)
    done = [m for m in cfg.distill.modes if (run.manifest(f"distill/{m}") or {}).get("status") == "done"]
    if not done:
        raise BayeskdError("no trained student: run `bayeskd distill` first")
    inputs = {f"student/{m}": (run.manifest(f"distill/{m}") or {}).get("fingerprint", "") for m in done}
    out = run.begin("eval", {"eval": asdict(cfg.eval), "data": cfg.data.identity()}, {"corpus": corpus.corpus_fp, **inputs}, force)
    if out is None:
        return None
    heldout = [i for i, pid in enumerate(corpus.dataset["prompt_id"]) if _heldout(cfg, pid)][: cfg.eval.max_examples]
    if not heldout:
        raise BayeskdError("no held-out example: raise data.heldout_fraction or collect more prompts")
    teacher = _oracle(cfg, corpus)
    students = {m: load_causal_lm(str(run.output(f"distill/{m}", "final"))) for m in done}  # checked against its manifest
    metrics = {"students": score_students(cfg, corpus, students, teacher, heldout), "estimates": {}}
    if "oracle-kd" in metrics["students"]:
        metrics["students"]["oracle-kd"]["note"] = "upper bound: trained on the true teacher distribution"
    if cfg.eval.estimates and teacher is not None and run.manifest("posterior"):
        metrics["estimates"] = {
            setting: score_estimates(cfg, run, corpus, teacher, heldout=setting == "heldout")
            for setting in ("train", "heldout")
        }
    write_json_atomic(out / "metrics.json", metrics)
    from bayeskd.report import write_report

    write_report(run, metrics, out)
    run.finish("eval", "done", {"metrics": str(out / "metrics.json"), "report": str(out / "report.md")})
    return {"table": comparison_table(metrics), "report": str(out / "report.md")}


def comparison_table(metrics: dict) -> str:
    rows = ["| student | bpb | KL to teacher | ROUGE-L | accuracy |", "|---|---|---|---|---|"]
    for mode, s in metrics["students"].items():
        acc = "-" if s.get("accuracy") is None else f"{s['accuracy']:.3f}"
        kl = f"{s['kl_teacher']:.3f}" if "kl_teacher" in s else "-"
        rows.append(f"| {mode} | {s['bpb']:.4f} | {kl} | {s['rouge_l']:.3f} | {acc} |")
    return "\n".join(rows)


def dump(metrics: dict) -> str:
    return json.dumps(metrics, indent=2)
