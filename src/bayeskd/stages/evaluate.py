"""Stage `eval`: the students and the estimates, on held-out prompts (method.md, section 5).

Students (every `distill/<mode>` that is done), on the held-out split's first
`eval.max_examples` examples:
- `bpb`: the teacher's responses' NLL under the student, in bits per UTF-8 byte of the text;
- `rouge_l`: greedy generations against the teacher's responses; `accuracy`: exact match on
  prompts with checkable answers;
- `kl_teacher`: KL(p_T || p_S) per response token, when the teacher can serve as an oracle and
  shares the student's tokenizer;
- `kl_teacher_byte`: KL(p_T || p_S) of the next byte at the offsets where both tokenizations
  start a token (`nextbyte`), with any oracle: the fidelity measure that stays defined when the
  tokenizers differ (then the per-token KL and the estimates' fidelity are skipped, and
  `metrics.json` says so under `skipped`).

Estimates (oracle only): per-token KL(p_T || p_hat), top-1 agreement and teacher-token NLL for
smoothed one-hot, prior, proxy (with `proxy.align: sft+dpo`, the DPO proxy, and the SFT proxy
it started from as `proxy (sft)`), the posterior without and with the teacher's logprob evidence,
and the control lambda * one-hot + (1 - lambda) *
proxy (best lambda), in two settings: `train` (training positions; the prior's counts include
the scored sequence, as when the student trains) and `heldout` (their counts are excluded).
All distributions are dense over the vocabulary here, so the numbers are exact.

Writes `eval/metrics.json` and `eval/report.md` with plots.

Under `accelerate launch` every rank scores a consecutive slice of the examples (about equal
response positions; for generation, of the prompts) and rank 0 gathers the sums and the
per-position values, then writes the metrics: the numbers one process gives, within float
rounding. The fidelity scoring covers the same examples whatever the split (the batches one
process would reach within `eval.fidelity_positions`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import torch

from bayeskd.estimate import blackbox
from bayeskd.estimate import distributions as D
from bayeskd.evaluate import metrics as M
from bayeskd.evaluate import nextbyte
from bayeskd.estimate import ngram
from bayeskd.evaluate.answers import is_correct
from bayeskd.artifacts import Run, write_json_atomic
from bayeskd.ranks import Launch
from bayeskd.config import Config
from bayeskd.corpus import TokenizedCorpus, load_corpus
from bayeskd.errors import BayeskdError
from bayeskd.estimate.update import (
    evidence_in_target,
    evidence_top,
    load_prior,
    record_evidence,
    record_generator,
    response_spans,
    sampling_of,
    topk_targets,
    update,
)
from bayeskd.estimate.evidence import EvidenceMapper
from bayeskd.models import load_causal_lm, load_tokenizer, tokenizer_fingerprint
from bayeskd.evaluate.oracle import teacher_probs
from bayeskd.stages import proxy_model
from bayeskd.evaluate.report import SFT_PROXY, comparison_table, estimate_names, write_report


CROSS_VOCAB = (
    "the teacher's tokenizer is not the student's: KL(teacher || student) per token and the estimates' "
    "fidelity (per-token KL, top-1, by position) are undefined across vocabularies and skipped; the "
    "next-byte KL (`kl_teacher_byte`), bits per byte, ROUGE-L and accuracy are reported"
)


@dataclass
class Oracle:
    """The teacher as an open model (evaluator only), its tokenizer, and whether that is the student's."""

    model: object
    tokenizer: object
    same_tokenizer: bool


def _oracle(cfg: Config, corpus: TokenizedCorpus) -> Oracle | None:
    if not cfg.eval.oracle:
        return None
    from bayeskd.evaluate.oracle import load_oracle, oracle_model

    try:
        model = load_oracle(cfg, None)
    except BayeskdError as e:
        print(f"eval: no oracle ({e}); teacher KL and fidelity are skipped")
        return None
    tok = load_tokenizer(oracle_model(cfg))
    same = tokenizer_fingerprint(tok) == corpus.tokenizer_fp
    if not same:
        print(f"eval: {CROSS_VOCAB}")
    return Oracle(model, tok, same)


def _responses(corpus: TokenizedCorpus, indices: list[int]) -> np.ndarray:
    """Response positions of each of the dataset rows `indices`: the work each costs."""
    return np.asarray(corpus.dataset["n_response"], dtype=np.int64)[np.asarray(indices, dtype=np.int64)]


def score_students(
    cfg: Config, corpus: TokenizedCorpus, students: dict, oracle: Oracle | None, indices: list[int],
    launch: Launch | None = None,
) -> dict | None:
    """bpb, NLL, ROUGE-L, accuracy and, with an oracle, KL(p_T || p_S) per token (one tokenizer only)
    and per next byte (any tokenizers: `nextbyte`) of each student on `indices`.

    In a distributed `launch`, this rank scores its slice and rank 0 returns the whole; the others None."""
    launch = launch or Launch()
    lo, hi = launch.shard(_responses(corpus, indices))
    teacher = oracle.model if oracle is not None and oracle.same_tokenizer else None
    firsts = nextbyte.first_bytes(corpus.tokenizer) if oracle is not None else None
    t_firsts = nextbyte.first_bytes(oracle.tokenizer) if oracle is not None else None
    sums: dict[str, dict] = {m: defaultdict(float) for m in students}
    n_bytes = n_tokens = shared = 0
    for rb in corpus.batches(indices[lo:hi], cfg.eval.batch_size, "eval: students"):
        labels = rb.labels()
        n_bytes += sum(len(corpus.records[r["index"]]["text"].encode()) for r in rb.rows)
        n_tokens += sum(len(x) for x in labels)
        zt = rb.logits(teacher) if teacher is not None else None
        boundaries = []  # per row: (student positions, teacher next-byte dists) at the offsets both start a token at
        if oracle is not None:
            for row, y in zip(rb.rows, labels):
                record = corpus.records[row["index"]]
                t_bytes = nextbyte.teacher_next_bytes(record, oracle.model, oracle.tokenizer, t_firsts,
                                                      lambda z: teacher_probs(cfg, z))  # fmt: skip
                spans = response_spans(record, corpus.tokenizer, cfg.data.template, len(y))
                pos, seen = [], set()
                for j, (a, _) in enumerate(spans):
                    if a in t_bytes and a not in seen:
                        pos.append(j)
                        seen.add(a)
                boundaries.append((pos, np.stack([t_bytes[spans[j][0]] for j in pos]) if pos else None))
                shared += len(pos)
        for mode, model in students.items():
            for b, z in enumerate(rb.logits(model)):
                sums[mode]["nll"] += float(M.token_nll(z, labels[b]).sum())
                if zt is not None:
                    p_t = teacher_probs(cfg, zt[b])
                    sums[mode]["kl"] += float(M.kl_dense(p_t, torch.softmax(z, -1)).sum())
                if boundaries and boundaries[b][0]:
                    pos, t_dist = boundaries[b]
                    s_dist = nextbyte.next_byte(torch.softmax(z[pos].float(), -1), firsts)
                    sums[mode]["kl_byte"] += float(M.kl_dense(t_dist, s_dist).sum())
    mine = {"sums": {m: dict(v) for m, v in sums.items()}, "n_bytes": n_bytes, "n_tokens": n_tokens, "shared": shared,
            "gen": {m: _generate(cfg, corpus, model, indices, launch) for m, model in students.items()}}  # fmt: skip
    parts = launch.gather("eval students", mine)
    if parts is None:
        return None
    n_bytes, n_tokens, shared = (sum(x[k] for x in parts) for k in ("n_bytes", "n_tokens", "shared"))
    out = {}
    for mode in students:
        sums = {mode: defaultdict(float)}
        for x in parts:
            for k, v in x["sums"][mode].items():
                sums[mode][k] += v
        gen = _generation_scores([x["gen"][mode] for x in parts])
        out[mode] = {
            "bpb": M.bits_per_byte(sums[mode]["nll"], n_bytes),
            "nll_per_token": sums[mode]["nll"] / max(n_tokens, 1),
            **({"kl_teacher": sums[mode]["kl"] / max(n_tokens, 1)} if teacher is not None else {}),
            **({"kl_teacher_byte": sums[mode]["kl_byte"] / max(shared, 1), "byte_positions": shared,
                "share_positions_shared": shared / max(n_tokens, 1)} if oracle is not None else {}),  # fmt: skip
            **gen,
            "tokens": n_tokens,
            "prompts": len({corpus.dataset[i]["prompt_id"] for i in indices}),
        }
    return out


def _generate(cfg: Config, corpus: TokenizedCorpus, model, indices: list[int], launch: Launch) -> dict:
    """ROUGE-L per prompt and the answers checked and correct, on this rank's slice of the prompts of `indices`."""
    tok = corpus.tokenizer
    side, tok.padding_side = tok.padding_side, "left"  # generation pads on the left; restored below
    try:
        return _generate_left_padded(cfg, corpus, model, indices, launch)
    finally:
        tok.padding_side = side


def _generation_scores(parts: list[dict]) -> dict:
    rouge = [r for x in parts for r in x["rouge"]]
    correct, checked = sum(x["correct"] for x in parts), sum(x["checked"] for x in parts)
    return {"rouge_l": float(np.mean(rouge)) if rouge else 0.0, "accuracy": correct / checked if checked else None,
            "answer_prompts": checked}


def _generate_left_padded(cfg: Config, corpus: TokenizedCorpus, model, indices: list[int], launch: Launch) -> dict:
    tok = corpus.tokenizer
    max_new = cfg.eval.max_new_tokens or cfg.collect.max_tokens
    records = [corpus.records[corpus.dataset[i]["index"]] for i in indices]
    seen, unique = set(), []
    for r in records:  # one generation per prompt: greedy decoding is the same for every sample
        if r["prompt_id"] not in seen:
            seen.add(r["prompt_id"])
            unique.append(r)
    lo, hi = launch.shard(np.ones(len(unique)))  # every sample of a prompt stays in `records`: its references
    unique = unique[lo:hi]
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
    return {"rouge": rouge, "correct": correct, "checked": checked}


def score_estimates(cfg: Config, run: Run, corpus: TokenizedCorpus, teacher, heldout: bool) -> dict | None:
    """Fidelity of each estimate to the teacher, dense over the vocabulary, in one setting.

    Held-out, also the black-box NLL of the estimates that do not contain the scored token,
    next to their oracle KL, and how well the two agree on their order (`blackbox`).

    The examples scored are the batches one process reaches within `eval.fidelity_positions`; in
    a distributed launch (`run.launch`) each rank scores a slice of them and rank 0 returns the
    whole, the others None."""
    launch = run.launch
    prior = load_prior(cfg, run)
    proxy = load_causal_lm(str(proxy_model(cfg, run)))
    # With proxy.align sft+dpo, `proxy` is the DPO one; the SFT proxy it started from is scored beside it.
    sft = load_causal_lm(str(run.output("proxy", "final"))) if cfg.proxy.align == "sft+dpo" else None
    vocab, p = len(corpus.tokenizer), cfg.posterior
    indices = corpus.indices("heldout" if heldout else "train")
    mapper = EvidenceMapper(corpus.tokenizer) if p.use_logprobs else None
    acc: dict[str, list] = defaultdict(list)
    sampling = sampling_of(cfg)
    covered, positions, n_response = [], 0, _responses(corpus, indices)
    for lo in range(0, len(indices), cfg.eval.batch_size):  # whole batches, until the budget is reached
        if positions >= cfg.eval.fidelity_positions:
            break
        covered += indices[lo : lo + cfg.eval.batch_size]
        positions += int(n_response[lo : lo + cfg.eval.batch_size].sum())
    lo, hi = launch.shard(n_response[: len(covered)])
    for rb in corpus.batches(covered[lo:hi], cfg.eval.batch_size, f"eval: fidelity ({'heldout' if heldout else 'train'})"):
        z_sft = rb.logits(sft) if sft is not None else [None] * len(rb.rows)
        for row, y, zt, zp, zs in zip(rb.rows, rb.labels(), rb.logits(teacher), rb.logits(proxy), z_sft):
            y = y.numpy()
            ids = np.asarray(row["input_ids"])
            ctx = ngram.contexts(ids[: len(ids) - len(y)], y, prior.order, vocab)
            p_t = teacher_probs(cfg, zt).double().numpy()
            p_proxy = torch.softmax(zp / p.proxy_temperature, -1).double().numpy()
            # As the student sees it: in the train setting the scored sequence's own counts are in
            # the tables (left out when prior.leave_one_out, as the posterior stage did).
            loo = y if (not heldout and cfg.prior.leave_one_out) else None
            p_prior = prior.dense(ctx, targets=loo)
            gen = record_generator(p.seed, row["index"])
            bare = update(p_prior, p_proxy, prior.query(ctx, 1, targets=loo).kappa, p, gen)
            record, every = corpus.records[row["index"]], np.tile(np.arange(vocab), (len(y), 1))
            raw = record_evidence(mapper, record, corpus.tokenizer, cfg.data.template, len(y), evidence_top(cfg))
            ev = evidence_in_target(raw, sampling, p_proxy)  # the proxy shapes the unlisted mass, as in `posterior`
            estimates = {"one-hot": M.smoothed_one_hot(y, vocab, cfg.eval.one_hot_eps), "prior": p_prior,
                         "proxy": p_proxy, "posterior-no-logprobs": bare,
                         "posterior": bare if ev is None else D.apply_evidence(bare, every, *ev)}  # fmt: skip
            if zs is not None:
                estimates[SFT_PROXY] = torch.softmax(zs / p.proxy_temperature, -1).double().numpy()
            if mapper is not None:  # what topk-kd trains on (the sampled token's own logprob included), the tail uniform
                estimates["top-k alone"] = topk_targets(raw, len(y), sampling).dense(vocab)
            if heldout and ev is not None:  # the API's top-k without the sampled token's own logprob: black-box scorable
                raw = record_evidence(mapper, record, corpus.tokenizer, cfg.data.template, len(y), evidence_top(cfg), False)
                estimates["posterior (top-k only)"] = D.apply_evidence(bare, every, *evidence_in_target(raw, sampling, p_proxy))
                estimates["top-k alone (top-k only)"] = topk_targets(raw, len(y), sampling).dense(vocab)
            hard = np.zeros_like(p_proxy)
            hard[np.arange(len(y)), y] = 1.0
            for lam in cfg.eval.control_lambdas:
                estimates[f"one-hot+proxy@{lam}"] = lam * hard + (1 - lam) * p_proxy
                estimates[f"one-hot+posterior@{lam}"] = lam * hard + (1 - lam) * bare
            for name, est in estimates.items():
                for k, v in M.fidelity(p_t, est, y).items():
                    acc[f"{name}/{k}"].append(v)
            acc["position"].append(np.arange(len(y)))
    parts = launch.gather(f"eval fidelity {'heldout' if heldout else 'train'}", dict(acc))
    if parts is None:
        return None
    acc = defaultdict(list)
    for part in parts:  # in rank order: the positions in the order one process scores them
        for k, v in part.items():
            acc[k] += v
    positions = sum(len(x) for x in acc["position"])
    if positions == 0:
        return {}
    out = {name: _means(acc, name) for name in (*estimate_names(acc), *_covering(acc, TOPK_ONLY)) if "+" not in name}
    for name in ("one-hot+proxy", "one-hot+posterior"):  # the controls, at their best lambda
        best = min(cfg.eval.control_lambdas, key=lambda lam: _means(acc, f"{name}@{lam}")["kl"])
        out[name] = {**_means(acc, f"{name}@{best}"), "lambda": best}
    for v in out.values():
        v.update(tokens=positions, prompts=len({corpus.dataset[i]["prompt_id"] for i in indices}))
    out["by_position"] = _by_position(acc)
    out["leave_one_out"] = bool(cfg.prior.leave_one_out and not heldout)
    if heldout:
        out["blackbox"] = _blackbox(acc)
    return out


# Held out, with logprobs: estimates from the API's top-k without the sampled token's own logprob
# (which the teacher's draw decides), so that the black-box NLL may score them.
TOPK_ONLY = ("posterior (top-k only)", "top-k alone (top-k only)")


def _covering(acc: dict, names: tuple[str, ...]) -> list[str]:
    """Those of `names` scored at every position (records without logprobs leave gaps): rows must cover the same positions."""
    return [n for n in names if len(acc.get(f"{n}/kl", ())) == len(acc["prior/kl"])]


def _means(acc: dict, name: str) -> dict:
    return {k: float(np.concatenate(acc[f"{name}/{k}"]).mean()) for k in ("kl", "top1", "nll")}


def _blackbox(acc: dict) -> dict:
    """The held-out NLL of the teacher's own tokens (no oracle) beside the oracle KL, for every
    estimate that does not contain the scored token, and their rank agreement (Kendall's tau).

    Where the top-k only posterior was not scored at every position (records without logprobs),
    it is left out, so that all rows cover the same positions."""
    names = ["prior", "proxy", *([SFT_PROXY] if f"{SFT_PROXY}/kl" in acc else []), "posterior-no-logprobs",
             *_covering(acc, TOPK_ONLY)]
    rows = {n: {"nll": m["nll"], "kl": m["kl"]} for n in names for m in [_means(acc, n)]}
    tau = blackbox.kendall_tau([r["nll"] for r in rows.values()], [r["kl"] for r in rows.values()])
    return {"estimates": rows, "kendall_tau": tau}


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


def run_eval(cfg: Config, run: Run, force: bool = False) -> dict | None:
    corpus = load_corpus(cfg, run, gold=True)  # the gold answers: accuracy is measured here, and only here
    done = [m for m in cfg.distill.modes if (run.manifest(f"distill/{m}") or {}).get("status") == "done"]
    if not done:
        raise BayeskdError("no trained student: run `bayeskd distill` first")
    inputs = {f"student/{m}": (run.manifest(f"distill/{m}") or {}).get("fingerprint", "") for m in done}
    out = run.begin("eval", {"eval": asdict(cfg.eval), "data": cfg.data.identity()}, {"corpus": corpus.corpus_fp, **inputs}, force)
    if out is None:
        return None
    heldout = corpus.indices("heldout")[: cfg.eval.max_examples]
    if not heldout:
        raise BayeskdError("no held-out example: raise data.heldout_fraction or collect more prompts")
    oracle = _oracle(cfg, corpus)
    students = {m: load_causal_lm(str(run.output(f"distill/{m}", "final"))) for m in done}  # checked against its manifest
    launch = run.launch
    metrics = {"students": score_students(cfg, corpus, students, oracle, heldout, launch) or {}, "estimates": {}}  # {}: not rank 0
    if "oracle-kd" in metrics["students"]:
        metrics["students"]["oracle-kd"]["note"] = "upper bound: trained on the true teacher distribution"
    if oracle is not None and not oracle.same_tokenizer:
        metrics["skipped"] = CROSS_VOCAB
    elif cfg.eval.estimates and oracle is not None and run.manifest("posterior"):
        fitted = blackbox.effective(cfg, run)  # the estimates as the posterior made them
        metrics["estimates"] = {
            setting: score_estimates(fitted, run, corpus, oracle.model, heldout=setting == "heldout")
            for setting in ("train", "heldout")
        }
    if not launch.main:  # rank 0 has every rank's scores: it alone writes
        return None
    write_json_atomic(out / "metrics.json", metrics)
    write_report(run, metrics, out)
    run.finish("eval", "done", {"metrics": str(out / "metrics.json"), "report": str(out / "report.md")})
    return {"table": comparison_table(metrics), "report": str(out / "report.md")}
