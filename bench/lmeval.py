"""lm-evaluation-harness against `bayeskd serve`: a peer's client computes log-likelihoods over our API.

    pip install -e '.[bench]'      # lm-eval[api] (not in CI's dev extra: it pulls ~40 packages)
    python bench/lmeval.py [--model smollm2-135m-instruct] [--out bench/out/lmeval.json]

lm-eval's `local-completions` model (OpenAI-compatible completions, `tokenizer_backend=huggingface`)
runs a tiny local task (a JSONL file and a task YAML in a temp folder; no hub download) of
`loglikelihood` requests against `bayeskd serve` (in this process, loopback). It sends token-id
prompts in batches with `echo: true`, `logprobs: 1`, `max_tokens: 1` and sums the echoed
`token_logprobs` of the continuation. Each log-likelihood is compared with our own scoring:
the same model run directly, the sum of the continuation tokens' log-probabilities, with the
context/continuation split lm-eval uses (tokens of context + continuation after those of the
context). The model: the embedded teacher SmolLM2-135M-Instruct by default, or any folder.

tests/integration/test_lmeval.py runs the same on tiny models (teacher and a student checkpoint)
where lm-eval is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DOCS = [
    {"context": "What is the capital of France?", "continuation": " The capital of France is Paris."},
    {"context": "Count: one, two,", "continuation": " three, four."},
    {"context": "Q: What is 2 + 2?\nA:", "continuation": " 4"},
    {"context": "The opposite of hot is", "continuation": " cold."},
    {"context": "Translate to French: cat", "continuation": " chat"},
]


def write_task(folder: Path, docs: list[dict], name: str = "bayeskd_tiny") -> Path:
    """A `loglikelihood` task over `docs` (JSONL in `folder`) and its YAML; returns the task folder."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = folder / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    )
    return tasks


def lmeval_logliks(base_url: str, model_name: str, tokenizer: str, docs: list[dict], folder: Path) -> list[float]:
    """lm-eval's log-likelihood of each doc's continuation, through `base_url` (…/v1), in docs' order."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = write_task(folder, docs)
    args = (f"model={model_name},base_url={base_url}/completions,tokenizer_backend=huggingface,"
            f"tokenizer={tokenizer},num_concurrent=2,max_retries=1,batch_size=4")  # fmt: skip
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["bayeskd_tiny"],
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True)  # fmt: skip
    samples = sorted(out["samples"]["bayeskd_tiny"], key=lambda s: s["doc_id"])
    return [float(s["resps"][0][0][0]) for s in samples]


def own_logliks(model_ref: str, docs: list[dict]) -> list[float]:
    """Our scoring: the model run directly, sum of log p(continuation token | everything before it)."""
    import torch

    from bayeskd.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(model_ref), load_causal_lm(model_ref).eval()
    out = []
    for d in docs:
        ctx = tok(d["context"], add_special_tokens=False)["input_ids"]
        whole = tok(d["context"] + d["continuation"], add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        out.append(float(sum(logp[t - 1, whole[t]] for t in range(len(ctx), len(whole)))))
    return out


def compare(model_ref: str, docs: list[dict], folder: Path, served_name: str = "model") -> dict:
    """lm-eval through `bayeskd serve` against our own scoring, for one model."""
    from bayeskd.models import resolve
    from bayeskd.teachers.config import ServeConfig
    from bayeskd.teachers.local import LocalTeacher
    from bayeskd.teachers.hosting import BackgroundServer

    t0 = time.perf_counter()
    with BackgroundServer(LocalTeacher(model_ref, batch_size=8), ServeConfig(port=0), served_name=served_name) as s:
        theirs = lmeval_logliks(s.base_url, served_name, resolve(model_ref), docs, folder)
    ours = own_logliks(model_ref, docs)
    diffs = [abs(a - b) for a, b in zip(theirs, ours)]
    return {"model": model_ref, "docs": len(docs), "lmeval": theirs, "own": ours, "max_abs_diff": max(diffs),
            "seconds": time.perf_counter() - t0}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="bench/out/lmeval.json")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = compare(a.model, DOCS, Path(tmp))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    ok = result["max_abs_diff"] <= a.tolerance
    print(f"{'OK' if ok else 'MISMATCH'}: max |lm-eval - own| = {result['max_abs_diff']:.2e} (tolerance {a.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
