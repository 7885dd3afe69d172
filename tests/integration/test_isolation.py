"""The closed teacher's weights never reach the method: only `serve`, `eval` and `oracle-kd` read them.

The real-world benchmark's setting (bench/studies/realworld.py) on tiny models: a "closed" teacher served
over HTTP from a folder of its own, a task file with its own splits (`data.split: prompts`). While
the method's stages run, the teacher's folder does not exist (the server loaded it before it was
moved away): any stage that tried to read it would fail. It comes back for the evaluator alone.
The tasks' gold answers are the evaluator's too: the method's stages read the corpus without them.
"""

from __future__ import annotations

import json
import shutil

from bayeskd.artifacts import Run
from bayeskd.cli import main
from bayeskd.teachers.config import ServeConfig
from bayeskd.config import load_config
from bayeskd.corpus import load_corpus
from bayeskd.teachers.local import LocalTeacher
from bayeskd.teachers.hosting import BackgroundServer


def write_tasks(path, n: int = 30) -> dict[str, str]:
    """Prompts with gold answers and their own split: every fifth held out, every fifth + 1 validation."""
    splits = {}
    with open(path, "w") as f:
        for i in range(n):
            split = "heldout" if i % 5 == 0 else "validation" if i % 5 == 1 else "train"
            splits[f"add/{i}"] = split
            f.write(json.dumps({"id": f"add/{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i), "split": split}) + "\n")
    return splits


def test_method_stages_run_without_the_teachers_folder(tiny_teacher_dir, tmp_path):
    closed = tmp_path / "closed-teacher"
    shutil.copytree(tiny_teacher_dir, closed)
    splits = write_tasks(tmp_path / "tasks.jsonl")
    run = tmp_path / "run"
    train = "max_steps=4,batch_size=4,save_every=2,warmup_steps=1,lr=0.01,init_layers=null,eval_every=2"
    with BackgroundServer(LocalTeacher(str(closed)), ServeConfig(port=0), served_name="closed") as server:
        hidden = tmp_path / "moved-away"
        closed.rename(hidden)  # from here on, nothing can read the teacher's weights from disk
        args = [f"run_dir={run}", "teacher.backend=openai", "teacher.model=closed", "teacher.name=closed-api",
                f"teacher.base_url={server.base_url}",
                f"collect.prompts={tmp_path / 'tasks.jsonl'}", "collect.n=2", "collect.max_tokens=6",
                "collect.top_logprobs=3", "data.split=prompts", f"eval.oracle_model={closed}",
                *[f"{s}.train.model={tiny_teacher_dir}" for s in ("proxy", "distill")],
                *[f"{s}.train.{kv}" for s in ("proxy", "distill") for kv in train.split(",")],
                "distill.train.select=best_validation"]  # fmt: skip
        method = [*args, "distill.modes=[sft, bayes, proxy-kd, topk-kd]"]
        for stage in ("collect", "prior", "proxy", "posterior", "distill"):
            assert main([stage, *method]) == 0, stage
        assert not closed.exists()
        hidden.rename(closed)  # the evaluator, and the oracle-kd upper bound, may read it
        everything = [*args, "distill.modes=[sft, bayes, proxy-kd, topk-kd, oracle-kd]"]
        assert main(["distill", *everything]) == 0
        assert main(["eval", *everything]) == 0
    rows = [json.loads(x) for x in (run / "collect" / "corpus.jsonl").read_text().splitlines()]
    assert {r["prompt_id"]: r["split"] for r in rows} == splits  # each prompt kept the split its file named
    prior = json.loads((run / "prior" / "manifest.json").read_text())["summary"]
    assert prior["examples"] == 2 * list(splits.values()).count("train")  # neither validation nor held-out counted
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    held = {s["prompts"] for s in metrics["students"].values()}
    assert held == {list(splits.values()).count("heldout")}
    assert metrics["students"]["oracle-kd"]["kl_teacher"] >= 0 and "upper bound" in metrics["students"]["oracle-kd"]["note"]
    cfg = load_config(None, method)
    assert all("answer" not in r for r in load_corpus(cfg, Run(run)).records)  # what prior ... distill read
    answers = {r["prompt_id"]: r["answer"] for r in load_corpus(cfg, Run(run), gold=True).records}
    assert answers == {f"add/{i}": str(2 * i) for i in range(30)}  # the evaluator's accuracy reads them
    corpus = (run / "collect" / "corpus.jsonl").read_bytes()
    with BackgroundServer(LocalTeacher(str(closed)), ServeConfig(port=0), served_name="closed") as moved:
        assert moved.base_url != server.base_url
        again = [a for a in method if not a.startswith("teacher.base_url=")] + [f"teacher.base_url={moved.base_url}"]
        assert main(["collect", *again]) == 0  # a named teacher at a new address: the finished corpus stands
    assert (run / "collect" / "corpus.jsonl").read_bytes() == corpus
