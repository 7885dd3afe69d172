"""Can the posterior earn its keep with more context? Two candidates of issue 18, item 3, measured.

    HF_HUB_OFFLINE=1 python bench/studies/context.py [--config bench/studies/regimes.yaml] [--run runs/regimes/base]
        [--regimes 0 5 20] [--positions 600] [--out bench/out/context]

On a finished run with a validation split (bench/studies/regimes.yaml's base: collect, prior, proxy):

- **Context-dependent M.** The proxy's weight in the Dirichlet depends on the position:
  log M_t = log M + b (H_P,t - mean H_P) + c (log kappa_t - mean log kappa), with H_P,t the
  proxy's entropy and kappa_t the prior's strength (N(h) + mu) there. b = c = 0 is the constant M
  of `posterior.fit: auto`.
- **The exact prefix as the deepest level, with its own concentration.** With n samples per
  prompt, the other samples of the same prompt that share the whole prefix (x, y_<t) are the
  teacher's own draws at exactly that context (what `probe` buys with API calls, here free):
  p = (A p_post + c_sib) / (A + n_sib), with A fitted (A = inf: not used). Its positions are
  scored leave-one-out (the scored response's own token is never among its counts), as a student
  trains on them; held-out responses are scored against their own siblings, the training-time
  situation for prompts whose responses are all in the corpus.

Both are fitted, as `posterior.fit: auto` fits, by the black-box NLL of the teacher's sampled tokens
on the validation split (no oracle; the API's top-r applied, the sampled token's own logprob left
out), per regime r (the API's top-r logprobs; 0: none). The chosen settings are then scored on
held-out positions, dense over the vocabulary: the oracle KL(teacher || estimate) and the
black-box NLL. Writes OUT/context.json and OUT/context.md.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
from common import ROOT, open_finished_run  # bench/studies/common.py

TAUS = (1.0, 1.25)
GRID = {
    "mu": (2.0, 8.0, 32.0),
    "m": (1.0, 4.0, 16.0, 64.0, 256.0),
    "b": (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0),
    "c": (-1.0, -0.5, 0.0, 0.5, 1.0),
}
SIBLING_A = (float("inf"), 64.0, 16.0, 4.0, 1.0, 0.25)
WIDTH = 21  # evidence slots per position, as blackbox.gather keeps them


def siblings(ys: dict[int, np.ndarray], prompt_of: dict[int, str]) -> dict[int, list[list[int]]]:
    """Per record, per position t: the tokens the record's siblings (same prompt) drew after the same prefix y_<t."""
    groups: dict[str, list[int]] = {}
    for i, p in prompt_of.items():
        groups.setdefault(p, []).append(i)
    out = {}
    for i, y in ys.items():
        others = [ys[j] for j in groups[prompt_of[i]] if j != i]
        row = []
        for t in range(len(y)):
            row.append([int(o[t]) for o in others if len(o) > t and np.array_equal(o[:t], y[:t])])
        out[i] = row
    return out


def gather(cfg, corpus, proxy, teacher, split: str, regimes: list[int], limit: int, dense: bool) -> dict:
    """Everything the candidates need at up to `limit` positions of one split, p_P dense; p_T (the oracle) when `dense`."""
    import torch

    from bayeskd.estimate import ngram
    from bayeskd.estimate.update import record_evidence
    from bayeskd.estimate.evidence import EvidenceMapper

    vocab = len(corpus.tokenizer)
    indices = corpus.indices(split)
    ys, prompt_of = {}, {}
    for i in indices:  # the response tokens of every record of the split, for the sibling counts
        row = corpus.dataset[i]
        ys[i] = np.asarray(row["input_ids"][len(row["input_ids"]) - row["n_response"]:], np.int64)
        prompt_of[i] = row["prompt_id"]
    sib = siblings(ys, prompt_of)
    out = {k: [] for k in ("ctx", "y", "sib", *(f"ent{t}" for t in TAUS), *(f"ev{r}" for r in regimes))}
    out.update({f"p_proxy{t}": [] for t in TAUS}, p_t=[])
    n = 0
    mapper = EvidenceMapper(corpus.tokenizer)
    for rb in corpus.batches(indices, 8, f"context: {split}"):
        if n >= limit:
            break
        zts = rb.logits(teacher) if dense else [None] * len(rb.rows)
        for idx, row, y, zp, zt in zip(rb.indices, rb.rows, rb.labels(), rb.logits(proxy), zts):
            y = y.numpy()
            ids = np.asarray(row["input_ids"])
            out["ctx"].append(ngram.contexts(ids[: len(ids) - len(y)], y, cfg.prior.order, vocab))
            out["y"].append(y)
            out["sib"] += sib[idx][: len(y)]
            for t in TAUS:
                logp = torch.log_softmax(zp / t, -1)
                out[f"ent{t}"].append(-(logp.exp() * logp).sum(-1).double().numpy())
                out[f"p_proxy{t}"].append(logp.exp().double().numpy())
            if dense:
                out["p_t"].append(torch.softmax(zt / max(cfg.collect.temperature, 1e-6), -1).double().numpy())
            for r in regimes:
                e_ids, e_p = np.full((len(y), WIDTH), -1, np.int64), np.zeros((len(y), WIDTH))
                ev = record_evidence(mapper, corpus.records[row["index"]], corpus.tokenizer, cfg.data.template, len(y),
                                     r, sampled=False) if r else None  # fmt: skip
                if ev is not None:
                    e_ids[:, : ev[0].shape[1]], e_p[:, : ev[1].shape[1]] = ev
                out[f"ev{r}"].append((e_ids, e_p))
            n += len(y)
    g = {"ctx": np.concatenate(out["ctx"])[:limit], "y": np.concatenate(out["y"])[:limit], "sib": out["sib"][:limit]}
    for t in TAUS:
        g[f"ent{t}"] = np.concatenate(out[f"ent{t}"])[:limit]
        g[f"p_proxy{t}"] = np.concatenate(out[f"p_proxy{t}"])[:limit]
    if dense:
        g["p_t"] = np.concatenate(out["p_t"])[:limit]
    for r in regimes:
        g[f"ev{r}"] = (np.concatenate([e[0] for e in out[f"ev{r}"]])[:limit], np.concatenate([e[1] for e in out[f"ev{r}"]])[:limit])
    return g


# ---------------------------------------------------------------- the candidates


def proxy_weight(kappa: np.ndarray, ent: np.ndarray, s: dict, centre: dict) -> np.ndarray:
    """M_t [P]: M exp(b (H_P,t - mean H_P) + c (log kappa_t - mean log kappa)); b = c = 0 is a constant M."""
    return s["m"] * np.exp(s["b"] * (ent - centre["ent"]) + s["c"] * (np.log(kappa) - centre["log_kappa"]))


def sibling_counts(sib: list[list[int]], cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The siblings' draws on the candidates [P, C] (cand [P, C], PAD where unused), and their number [P]."""
    counts = np.zeros(cand.shape)
    for i, tokens in enumerate(sib):
        for w in tokens:
            counts[i] += cand[i] == w
    return counts, np.array([len(t) for t in sib], dtype=np.float64)


def estimate_on(prior_c, proxy_c, kappa, m_t, sib_c, n_sib, a: float) -> np.ndarray:
    """The expected update with a per-position M, then the exact-prefix level of concentration a."""
    k, m = kappa[:, None], m_t[:, None]
    post = (k * prior_c + m * proxy_c) / (k + m)
    if np.isfinite(a):
        post = (a * post + sib_c) / (a + n_sib[:, None])
    return post


class Split:
    """One split's values at its candidates (fit) or over the whole vocabulary (score), per (mu, tau, r)."""

    def __init__(self, g: dict, table, r: int, dense: bool):
        self.g, self.r, self.dense, self.table = g, r, dense, table
        ev_ids, self.ev_p = g[f"ev{r}"]
        P = len(g["y"])
        if dense:
            self.cand = np.tile(np.arange(g["p_proxy1.0"].shape[1]), (P, 1))
            self.ev_ids = ev_ids
        else:
            self.cand = np.concatenate([g["y"][:, None], ev_ids], 1)
        self.safe = np.where(self.cand >= 0, self.cand, 0)
        self.sib_c, self.n_sib = sibling_counts(g["sib"], self.cand)
        self._prior = {}

    def prior(self, mu: float):
        if mu not in self._prior:
            from bayeskd.estimate.prior import NGramPrior

            prior = NGramPrior(self.table, mu=mu, order=self.table.order)
            p = prior.dense(self.g["ctx"]) if self.dense else prior.prob(self.g["ctx"], self.safe)
            self._prior[mu] = (p, prior.query(self.g["ctx"], 1).kappa)
        return self._prior[mu]

    def proxy(self, tau: float) -> np.ndarray:
        p = self.g[f"p_proxy{tau}"]
        return p if self.dense else np.take_along_axis(p, self.safe, 1)

    def q(self, s: dict, centre: dict) -> np.ndarray:
        """The estimate of setting s: at the candidates [P, 1 + E], or dense [P, V] with the API's top-k applied."""
        from bayeskd.estimate import distributions as D

        prior_c, kappa = self.prior(s["mu"])
        m_t = proxy_weight(kappa, self.g[f"ent{s['tau']}"], s, centre)
        post = estimate_on(prior_c, self.proxy(s["tau"]), kappa, m_t, self.sib_c, self.n_sib, s["a"])
        if self.dense and self.r:
            post = D.apply_evidence(post, self.cand, self.ev_ids, self.ev_p)
        return post

    def q_at_y(self, s: dict, centre: dict) -> np.ndarray:
        from bayeskd.estimate import blackbox

        post = self.q(s, centre)
        if self.dense:
            return post[np.arange(len(post)), self.g["y"]]
        return blackbox.evidence_at_y(post, self.cand, self.ev_p) if self.r else post[:, 0]


def fit(val: Split, centre: dict, contextual: bool, siblings_too: bool) -> tuple[dict, float]:
    """The setting with the lowest black-box NLL on the validation split."""
    from bayeskd.estimate import blackbox

    bs, cs = (GRID["b"], GRID["c"]) if contextual else ((0.0,), (0.0,))
    best = None
    for mu, tau, m, b, c in itertools.product(GRID["mu"], TAUS, GRID["m"], bs, cs):
        s = {"mu": mu, "tau": tau, "m": m, "b": b, "c": c, "a": float("inf")}
        score = blackbox.nll(val.q_at_y(s, centre))
        if best is None or score < best[1]:
            best = (s, score)
    if siblings_too:
        for a in SIBLING_A[1:]:
            s = dict(best[0], a=a)
            score = blackbox.nll(val.q_at_y(s, centre))
            if score < best[1]:
                best = (s, score)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/studies/regimes.yaml")
    parser.add_argument("--run", default="runs/regimes/base")
    parser.add_argument("--regimes", type=int, nargs="+", default=[0, 5, 20])
    parser.add_argument("--positions", type=int, default=600, help="positions per split (validation: fit; held-out: score)")
    parser.add_argument("--out", default="bench/out/context")
    args = parser.parse_args()
    cfg, run, corpus, teacher = open_finished_run(args.config, args.run)
    from bayeskd.estimate import blackbox, ngram
    from bayeskd.estimate.prior import NGramPrior
    from bayeskd.evaluate import metrics as M
    from bayeskd.models import load_causal_lm

    proxy = load_causal_lm(str(run.output("proxy", "final")))
    table = ngram.NGramTable.load(run.output("prior", "tables"))
    g_val = gather(cfg, corpus, proxy, None, "validation", args.regimes, args.positions, dense=False)
    g_held = gather(cfg, corpus, proxy, teacher, "heldout", args.regimes, args.positions, dense=True)
    centre = {"ent": float(g_val["ent1.0"].mean()),
              "log_kappa": float(np.log(NGramPrior(table, mu=8.0, order=table.order).query(g_val["ctx"], 1).kappa).mean())}  # fmt: skip
    record = {"positions": {"validation": len(g_val["y"]), "heldout": len(g_held["y"])}, "centre": centre, "regimes": {}}
    record["sibling_share"] = {k: float(np.mean([len(s) > 0 for s in g["sib"]])) for k, g in (("validation", g_val), ("heldout", g_held))}
    variants = {"constant M (fit: auto)": (False, False), "context-dependent M": (True, False),
                "constant M + exact-prefix level": (False, True), "context-dependent M + exact-prefix level": (True, True)}  # fmt: skip
    rows_with_sib = np.array([len(s) > 0 for s in g_held["sib"]])
    for r in args.regimes:
        val, held = Split(g_val, table, r, dense=False), Split(g_held, table, r, dense=True)
        out = {}
        for name, (contextual, sib) in variants.items():
            s, score = fit(val, centre, contextual, sib)
            q = held.q(s, centre)
            kl = M.kl_dense(g_held["p_t"], q)
            out[name] = {"chosen": s, "validation_nll": score, "heldout_kl": float(kl.mean()),
                         "heldout_kl_sibling_positions": float(kl[rows_with_sib].mean()) if rows_with_sib.any() else None,
                         "heldout_nll": blackbox.nll(q[np.arange(len(q)), g_held["y"]])}  # fmt: skip
            print(f"top{r} {name}: {s} val NLL {score:.4f}, held-out KL {out[name]['heldout_kl']:.4f}, "
                  f"NLL {out[name]['heldout_nll']:.4f}", flush=True)  # fmt: skip
            del q
        record["regimes"][r] = out
    out_dir = ROOT / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "context.json").write_text(json.dumps(record, indent=2))
    md = tables(record)
    (out_dir / "context.md").write_text(md)
    print(md)


def tables(record: dict) -> str:
    p, sh = record["positions"], record["sibling_share"]
    lines = [f"Fitted on {p['validation']} validation positions (black-box NLL), scored on {p['heldout']} held-out "
             f"positions. Positions with a sibling that shares the whole prefix: {sh['validation']:.1%} (validation), "
             f"{sh['heldout']:.1%} (held-out).", "",
             "| regime | posterior | chosen | validation NLL | held-out KL ↓ | KL at sibling positions | held-out NLL ↓ |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r, out in record["regimes"].items():
        for name, v in out.items():
            s = v["chosen"]
            chosen = f"mu {s['mu']:g}, tau {s['tau']:g}, M {s['m']:g}, b {s['b']:g}, c {s['c']:g}, A {s['a']:g}"
            kls = "-" if v["heldout_kl_sibling_positions"] is None else f"{v['heldout_kl_sibling_positions']:.3f}"
            lines.append(f"| {'top-' + str(r) if int(r) else 'no logprobs'} | {name} | {chosen} | {v['validation_nll']:.3f} | "
                         f"{v['heldout_kl']:.3f} | {kls} | {v['heldout_nll']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
