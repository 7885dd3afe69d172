"""Which prior and posterior settings estimate the teacher best: the fidelity of the posterior
over a grid of n-gram order, mu and M, on a finished run (method.md, sections 1-2 and 5).

    HF_HUB_OFFLINE=1 python bench/studies/ablate.py --config bench/studies/claim.yaml --run runs/claim/seed0 [--positions 800]

For up to --positions response positions in each setting (`train`: training prompts, the
prior's counts with the scored sequence left out when prior.leave_one_out, and also left in;
`heldout`: held-out prompts), the teacher's true distribution (the oracle: evaluator only),
the run's proxy and the prior's tables are evaluated once; then every (order, mu, M)
combination is scored exactly, dense over the vocabulary: KL(p_T || p_post) for the
posterior alone and with the teacher's top-k logprob evidence (where the corpus has it), and,
held-out, the black-box NLL of the teacher's own tokens (no oracle) with the rank agreement of the
two over the grid. M = 0 is the prior alone; M = inf is the proxy alone. When the run has both
proxies (`proxy.align: sft+dpo`), the grid is scored on each (--proxies): the SFT proxy
(`proxy/final/`) and the DPO one (`proxy/dpo/final/`), so that the posterior built on either can
be compared cell by cell. Writes OUT/ablate.json and OUT/ablate.md.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import ROOT, open_finished_run  # bench/studies/common.py



def gather(cfg, run, corpus, teacher, proxy, heldout: bool, limit: int):
    """Dense p_T, p_proxy, contexts, tokens and evidence at up to `limit` positions of one setting."""
    import torch

    from bayeskd.estimate import ngram
    from bayeskd.estimate.update import record_evidence
    from bayeskd.estimate.evidence import EvidenceMapper

    mapper = EvidenceMapper(corpus.tokenizer)
    vocab = len(corpus.tokenizer)
    out = {"p_t": [], "p_proxy": [], "ctx": [], "y": [], "ev_ids": [], "ev_p": [], "bb_ids": [], "bb_p": []}
    n = 0
    for rb in corpus.batches(corpus.indices("heldout" if heldout else "train"), 8, f"ablate: {'heldout' if heldout else 'train'}"):
        if n >= limit:
            break
        for row, y, zt, zp in zip(rb.rows, rb.labels(), rb.logits(teacher), rb.logits(proxy)):
            y = y.numpy()
            ids = np.asarray(row["input_ids"])
            out["ctx"].append(ngram.contexts(ids[: len(ids) - len(y)], y, 4, vocab))
            out["y"].append(y)
            out["p_t"].append(torch.softmax(zt / max(cfg.collect.temperature, 1e-6), -1).double().numpy())
            out["p_proxy"].append(torch.softmax(zp, -1).double().numpy())
            # The evidence as the posterior uses it, and without the sampled token's own logprob (black-box scoring).
            for key, sampled in (("ev", True), ("bb", False)):
                ev_ids = np.full((len(y), 21), -1, np.int64)
                ev_p = np.zeros((len(y), 21))
                ev = record_evidence(mapper, corpus.records[row["index"]], corpus.tokenizer, cfg.data.template, len(y),
                                     cfg.posterior.top_logprobs, sampled)  # fmt: skip
                if ev is not None:
                    ev_ids[:, : ev[0].shape[1]], ev_p[:, : ev[1].shape[1]] = ev
                out[f"{key}_ids" if key == "bb" else "ev_ids"].append(ev_ids)
                out[f"{key}_p"].append(ev_p)
            n += len(y)
    return {k: np.concatenate(v)[:limit] for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/studies/claim.yaml")
    parser.add_argument("--run", default="runs/claim/seed0")
    parser.add_argument("--positions", type=int, default=800)
    parser.add_argument("--orders", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--mus", type=float, nargs="+", default=[0.5, 2.0, 8.0, 32.0])
    parser.add_argument("--ms", type=float, nargs="+", default=[0.0, 2.0, 8.0, 32.0, 128.0, float("inf")])
    parser.add_argument("--proxies", nargs="+", choices=["sft", "sft+dpo"], default=None,
                        help="the proxies to score the grid on (default: every one the run has)")
    parser.add_argument("--out", default="bench/out/ablate")
    args = parser.parse_args()
    cfg, run, corpus, teacher = open_finished_run(args.config, args.run)
    from bayeskd.estimate.prior import NGramPrior
    from bayeskd.estimate import blackbox, ngram
    from bayeskd.estimate import distributions as D
    from bayeskd.evaluate import metrics as M
    from bayeskd.models import load_causal_lm
    has_dpo = (run.manifest("proxy/dpo") or {}).get("status") == "done"
    proxies = args.proxies or ["sft", *(["sft+dpo"] if has_dpo else [])]
    folders = {"sft": ("proxy", "final"), "sft+dpo": ("proxy/dpo", "final")}
    table = ngram.NGramTable.load(run.output("prior", "tables"))
    vocab = len(corpus.tokenizer)
    settings = {"heldout": (True, False), "train (leave-one-out)": (False, True), "train (own counts in)": (False, False)}
    cache = {}
    results = []
    for proxy_name, (name, (heldout, loo)) in ((pn, item) for pn in proxies for item in settings.items()):
        if (proxy_name, heldout) not in cache:
            proxy = load_causal_lm(str(run.output(*folders[proxy_name])))
            cache[proxy_name, heldout] = gather(cfg, run, corpus, teacher, proxy, heldout, args.positions)
        g = cache[proxy_name, heldout]
        cand = np.tile(np.arange(vocab), (len(g["y"]), 1))
        has_ev = (g["ev_ids"] >= 0).any(1)
        control = min(
            (float(M.kl_dense(g["p_t"], lam * np.eye(vocab)[g["y"]] + (1 - lam) * g["p_proxy"]).mean()), lam)
            for lam in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
        )
        for order in args.orders:
            for mu in args.mus:
                prior = NGramPrior(table, mu=mu, order=order)
                ctx = g["ctx"]  # a lower order reads only its last order-1 columns
                targets = g["y"] if loo else None
                p_prior = prior.dense(ctx, targets=targets)
                kappa = prior.query(ctx, 1, targets=targets).kappa
                for m in args.ms:
                    post = g["p_proxy"] if np.isinf(m) else D.expected(p_prior, g["p_proxy"], kappa, m)
                    with_ev = D.apply_evidence(post, cand, g["ev_ids"], g["ev_p"]) if has_ev.any() else post
                    bb_ev = D.apply_evidence(post, cand, g["bb_ids"], g["bb_p"]) if has_ev.any() else post
                    rows = np.arange(len(g["y"]))
                    results.append({
                        "blackbox_nll": blackbox.nll(post[rows, g["y"]]),
                        "blackbox_nll_with_logprobs": blackbox.nll(bb_ev[rows, g["y"]]),
                        "kl_with_logprobs_topk_only": float(M.kl_dense(g["p_t"], bb_ev).mean()),
                        "proxy": proxy_name, "setting": name, "order": order, "mu": mu, "m": m, "positions": len(g["y"]),
                        "kl": float(M.kl_dense(g["p_t"], post).mean()),
                        "kl_with_logprobs": float(M.kl_dense(g["p_t"], with_ev).mean()),
                        "control_kl": control[0], "control_lambda": control[1],
                        "mean_kappa": float(kappa.mean()),
                    })  # fmt: skip
                print(f"{proxy_name} proxy, {name}: order {order} mu {mu}: " + ", ".join(
                    f"M={r['m']:g} {r['kl']:.3f}/{r['kl_with_logprobs']:.3f}" for r in results[-len(args.ms):]), flush=True)  # fmt: skip
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablate.json").write_text(json.dumps(results, indent=2))
    lines = []
    for proxy_name in proxies:
        lines += [f"## The {proxy_name} proxy", ""]
        for name in settings:
            rows = [r for r in results if r["setting"] == name and r["proxy"] == proxy_name]
            best = min(rows, key=lambda r: r["kl"])
            best_ev = min(rows, key=lambda r: r["kl_with_logprobs"])
            lines += [f"### {name} ({rows[0]['positions']} positions; one-hot+proxy control: KL {rows[0]['control_kl']:.3f} "
                      f"at lambda {rows[0]['control_lambda']})", "",
                      "KL(teacher ‖ posterior), without / with the teacher's top-k logprobs; rows: order, mu; columns: M "
                      "(0 = prior alone, inf = proxy alone)", "",
                      "| order | mu | " + " | ".join(f"M={m:g}" for m in args.ms) + " |",
                      "|---|---|" + "---|" * len(args.ms)]  # fmt: skip
            for order in args.orders:
                for mu in args.mus:
                    cells = [r for r in rows if r["order"] == order and r["mu"] == mu]
                    lines.append(f"| {order} | {mu:g} | " + " | ".join(f"{r['kl']:.3f} / {r['kl_with_logprobs']:.3f}" for r in cells) + " |")
            lines += ["", f"Best without logprobs: order {best['order']}, mu {best['mu']:g}, M {best['m']:g}: {best['kl']:.3f}. "
                      f"Best with: order {best_ev['order']}, mu {best_ev['mu']:g}, M {best_ev['m']:g}: {best_ev['kl_with_logprobs']:.3f}.", ""]  # fmt: skip
        held = [r for r in results if r["setting"] == "heldout" and r["proxy"] == proxy_name]
        if held:  # no oracle needed: does the teacher's own sampled tokens' NLL order the grid as the oracle KL does?
            tau = blackbox.kendall_tau([r["blackbox_nll"] for r in held], [r["kl"] for r in held])
            tau_ev = blackbox.kendall_tau([r["blackbox_nll_with_logprobs"] for r in held], [r["kl_with_logprobs_topk_only"] for r in held])
            best_bb, best_kl = min(held, key=lambda r: r["blackbox_nll"]), min(held, key=lambda r: r["kl"])
            lines += ["### held-out: the black-box NLL against the oracle KL, over the grid", "",
                      f"Kendall's tau over {len(held)} cells: {tau:.3f} without logprobs, {tau_ev:.3f} with the top-k "
                      f"(the sampled token's own logprob left out of both). The black-box NLL's best cell: order "
                      f"{best_bb['order']}, mu {best_bb['mu']:g}, M {best_bb['m']:g} (oracle KL {best_bb['kl']:.3f}); "
                      f"the oracle's best: order {best_kl['order']}, mu {best_kl['mu']:g}, M {best_kl['m']:g} "
                      f"(KL {best_kl['kl']:.3f}).", ""]  # fmt: skip
    if len(proxies) > 1:  # the proxy alone (M = inf) and the best posterior on it, proxy by proxy
        lines += ["## The proxies side by side", "",
                  "| setting | proxy | proxy alone: KL | held-out black-box NLL | best posterior without logprobs: KL | at |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name in settings:
            for proxy_name in proxies:
                rows = [r for r in results if r["setting"] == name and r["proxy"] == proxy_name]
                alone = next((r for r in rows if np.isinf(r["m"])), None)  # present when --ms has inf
                best = min(rows, key=lambda r: r["kl"])
                kl = f"{alone['kl']:.3f}" if alone else "-"
                nll = f"{alone['blackbox_nll']:.3f}" if alone and name == "heldout" else "-"
                lines.append(f"| {name} | {proxy_name} | {kl} | {nll} | {best['kl']:.3f} | "
                             f"order {best['order']}, mu {best['mu']:g}, M {best['m']:g} |")
        lines.append("")
    md = "\n".join(lines)
    (out / "ablate.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
