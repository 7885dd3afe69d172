"""Benchmark of teacher decoding: the continuous-batching decoder against HF `generate`, through serve and collect.

    python bench/generate.py [--quick] [--prompts 128] [--max-tokens 64] [--threads N] [--out bench/out/generate.json]

Model: the embedded teacher SmolLM2-135M-Instruct, fp32 on CPU. Requests: the built-in prompts
as chat messages, n=1, temperature 1, top_p 1, `--max-tokens` new tokens at most (EOS ends a
response earlier), seeded. Tokens/s counts completion tokens (EOS included, as APIs count
them) over wall time, prompt processing included. Rows:

  decoder B=16..128    LocalTeacher.stream: continuous batching with B rows in flight
  hf-generate B=...    the old path: static batches of B requests through model.generate
                       (left padding, sampling with top_k=0), as LocalTeacher did before; on
                       the first 64 prompts (its rate hardly depends on how many)
  serve C=32/64        `bayeskd serve` in this process (BackgroundServer, serve.max_batch's
                       default rows) under C concurrent OpenAI-SDK clients (threads)
  collect              bayeskd.stages.collect.run_collect on a temp run folder, local teacher
                       with teacher.batch_size's default

The ceiling: a big fp32 matmul's FLOP/s divided by 2N FLOPs per token (N the model's
parameters, each used once per token), measured for a second just before each row, since other
jobs on a shared machine come and go. Prompt tokens cost compute too, so a decoder cannot reach
it; the ratio says how much of the CPU the decoder turns into tokens. Timings on a shared
machine are noisy (~25%): compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "smollm2-135m-instruct"


def builtin_prompts() -> list[str]:
    from bayeskd.prompts import load_builtin_prompts

    return [p["prompt"] for p in load_builtin_prompts()]


def requests(prompts: list[str], max_tokens: int):
    from bayeskd.teachers.base import TeacherRequest

    return [TeacherRequest.chat([{"role": "user", "content": p}], max_tokens=max_tokens, temperature=1.0, seed=i)
            for i, p in enumerate(prompts)]  # fmt: skip


def matmul_gflops(seconds: float = 2.0) -> float:
    a, w = torch.randn(2048, 576), torch.randn(1536, 576)
    torch.nn.functional.linear(a, w)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.nn.functional.linear(a, w)
        n += 1
    return 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - t0) / 1e9


def timed(fn) -> dict:
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    completion, prompt = fn()
    s = time.perf_counter() - t0
    return {"s": s, "completion_tokens": completion, "prompt_tokens": prompt, "tokens_per_s": completion / s,
            "loadavg": [load0, os.getloadavg()[0]]}


def run_decoder(teacher, reqs) -> tuple[int, int]:
    results = [r for _, r in teacher.stream(reqs)]
    return sum(r.usage.completion_tokens for r in results), sum(r.usage.prompt_tokens for r in results)


def run_hf_generate(teacher, reqs, batch: int) -> tuple[int, int]:
    """The old LocalTeacher path: equal-parameter requests in static batches through model.generate."""
    tok, model = teacher.tokenizer, teacher.model
    tok.padding_side = "left"
    completion = prompt = 0
    for lo in range(0, len(reqs), batch):
        chunk = reqs[lo : lo + batch]
        enc = tok([teacher.prompt_text(r) for r in chunk], add_special_tokens=False, padding=True, return_tensors="pt")
        torch.manual_seed(lo)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=chunk[0].max_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            completion += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        prompt += int(enc["attention_mask"].sum())
    return completion, prompt


def run_serve(teacher, reqs, clients: int) -> tuple[int, int]:
    import openai

    from bayeskd.teachers.config import ServeConfig
    from bayeskd.teachers.hosting import BackgroundServer

    todo = list(reqs)
    lock = threading.Lock()
    totals = [0, 0]
    with BackgroundServer(teacher, ServeConfig(port=0, max_batch=teacher.batch_size, max_queue=1024)) as server:

        def client() -> None:
            sdk = openai.OpenAI(api_key="unused", base_url=server.base_url, max_retries=0, timeout=600)
            while True:
                with lock:
                    if not todo:
                        return
                    r = todo.pop(0)
                out = sdk.chat.completions.create(model=teacher.model_ref, messages=r.message_dicts(), seed=r.seed,
                                                  max_tokens=r.max_tokens, temperature=r.temperature)  # fmt: skip
                with lock:
                    totals[0] += out.usage.completion_tokens
                    totals[1] += out.usage.prompt_tokens

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return totals[0], totals[1]


def run_collect_stage(n_prompts: int, max_tokens: int, batch: int) -> tuple[int, int]:
    from bayeskd.artifacts import Run
    from bayeskd.config import load_config
    from bayeskd.stages.collect import run_collect

    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        cfg = load_config(overrides=[f"run_dir={tmp}", f"teacher.batch_size={batch}", f"collect.limit={n_prompts}",
                                     f"collect.max_tokens={max_tokens}", "collect.temperature=1.0"])  # fmt: skip
        run_collect(cfg, Run(cfg.run_dir))
        ledger = json.loads((Path(tmp) / "collect" / "ledger.json").read_text())
    return sum(ledger["completion_tokens"].values()), sum(ledger["prompt_tokens"].values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="48 prompts, 48 tokens, fewer rows (a few minutes)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, the CPU count)")
    ap.add_argument("--out", default="bench/out/generate.json")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_tokens = 48, 48
    if args.threads:
        torch.set_num_threads(args.threads)
    from rich.console import Console

    from bayeskd.teachers.local import LocalTeacher

    console = Console(width=160)
    prompts = builtin_prompts()[: args.prompts]
    reqs = requests(prompts, args.max_tokens)
    gflops = matmul_gflops()
    teacher = LocalTeacher(MODEL, batch_size=64)
    n_params = sum(p.numel() for p in teacher.model.parameters())
    ceiling = gflops * 1e9 / (2 * n_params)
    console.print(f"fp32 matmul {gflops:.0f} GFLOP/s on {torch.get_num_threads()} threads; N = {n_params / 1e6:.1f}M "
                  f"-> ceiling {ceiling:.0f} tokens/s; {len(reqs)} prompts, max_tokens {args.max_tokens}")
    run_decoder(teacher, reqs[:4])  # warm-up: first-call allocations, thread start
    runs = measure(console, teacher, reqs, args, n_params)
    print_table(console, runs, f"{MODEL} fp32, {len(reqs)} prompts, temperature 1, max_tokens {args.max_tokens}, "
                               f"{torch.get_num_threads()} torch threads; ceiling = matmul FLOP/s / 2N, "
                               "measured before each row")  # fmt: skip
    report = {"settings": vars(args) | {"model": MODEL, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                        "python": sys.version.split()[0], "torch": torch.__version__},
              "matmul_gflops": gflops, "params": n_params, "ceiling_tokens_per_s": ceiling, "runs": runs}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.out}")


def measure(console, teacher, reqs, args, n_params: int) -> list[dict]:
    """Every row of the table, one after another in this process; closes `teacher`."""
    from bayeskd.teachers.config import ServeConfig, TeacherConfig
    from bayeskd.teachers.local import LocalTeacher

    serve_rows, collect_rows = ServeConfig().max_batch, TeacherConfig().batch_size
    plan = []  # (name, rows in flight, function of a LocalTeacher with that batch_size or None)
    for b in (16, 64, 128) if args.quick else (16, 32, 64, 128):
        plan.append((f"decoder B={b}", b, lambda t: run_decoder(t, reqs)))
        if b <= 64:
            plan.append((f"hf-generate B={b}", b, lambda t, b=b: run_hf_generate(t, reqs[:64], b)))
    for c in (32,) if args.quick else (32, 64):
        plan.append((f"serve C={c}", serve_rows, lambda t, c=c: run_serve(t, reqs, c)))
    plan.append(("collect", collect_rows, None))
    runs = []
    for name, b, fn in plan:
        rate = matmul_gflops(1.0)
        if fn is None:
            r = timed(lambda: run_collect_stage(args.prompts, args.max_tokens, b))
        else:
            if teacher.batch_size != b:  # a teacher per rows-in-flight setting; loading takes about a second
                teacher.close()
                teacher = LocalTeacher(MODEL, batch_size=b)
            r = timed(lambda: fn(teacher))
        r |= {"name": name, "batch": b, "matmul_gflops": rate, "ceiling": rate * 1e9 / (2 * n_params)}
        runs.append(r)
        console.print(f"  {name}: {r['tokens_per_s']:.0f} tokens/s ({r['completion_tokens']} in {r['s']:.1f}s, "
                      f"load {r['loadavg'][0]:.1f}->{r['loadavg'][1]:.1f})")
    teacher.close()
    return runs


def print_table(console, runs: list[dict], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("path", "rows/batch", "completion tokens", "prompt tokens", "seconds", "tokens/s", "ceiling", "of ceiling",
                "load"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in runs:
        table.add_row(r["name"], str(r["batch"]), str(r["completion_tokens"]), str(r["prompt_tokens"]), f"{r['s']:.1f}",
                      f"{r['tokens_per_s']:.0f}", f"{r['ceiling']:.0f}", f"{r['tokens_per_s'] / r['ceiling']:.0%}",
                      f"{r['loadavg'][0]:.1f}/{r['loadavg'][1]:.1f}")  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    main()
