"""Benchmark of a training step: SFT against KD on cached sparse targets (bayeskd.train.losses.objective).

    python bench/train.py [--batch 4] [--seq 256] [--hidden 128] [--reps 7] [--threads N] [--out bench/out/train.json]

Student: a Llama built from config (2 layers, hidden 128) with the default teacher's real
vocabulary (49152), so that the output layer and the loss over [tokens, V] dominate as they
do for a small student. Data: random tokens, the first quarter of each row masked as prompt.
One step = forward, loss, backward, AdamW step. Every configuration runs in the same process,
interleaved round-robin after a warm-up round; the median and fastest wall times and the
median CPU time (all threads of the process) are reported. On a shared machine wall time is
noisy; CPU time with --threads 1 is the steadiest measure of the work a step does.

Configurations:
  sft-hf      F.cross_entropy on the shifted logits, as transformers' ForCausalLMLoss computes it
  sft         objective(lambda_ce=1): the same loss through bayeskd's fused kernel
  kd-K32      objective(lambda_ce=1, beta=1) with sparse targets, K = 32
  kd-K64      same, K = 64
  kd-prior+post-K64   lambda_ce=1, alpha=1, beta=1: two target sets of K = 64

Peak memory: the high-water mark of one step above the memory in use before it. On CUDA,
torch.cuda.max_memory_allocated (largest over the timed rounds). On CPU, each configuration
runs a warm-up step and three measured steps in a fresh child process, with a thread
sampling its resident set (VmRSS) every millisecond; the peak above the RSS at rest is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = 49152
CONFIGS = ("sft-hf", "sft", "kd-K32", "kd-K64", "kd-prior+post-K64")


def build(args: argparse.Namespace, device: torch.device):
    """(model, optimizer, {config: loss function of logits}) with fixed random data."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bayeskd.estimate.distributions import SparseDist
    from bayeskd.data import IGNORE_INDEX
    from bayeskd.train.losses import objective

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32), num_key_value_heads=max(1, args.hidden // 32), tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, t = args.batch, args.seq
    ids = torch.randint(0, VOCAB, (b, t), device=device)
    labels = ids.clone()
    labels[:, : t // 4] = IGNORE_INDEX

    def targets(k: int) -> SparseDist:
        # clone(): a view would keep each 49152-long permutation alive until the stack, and the
        # freed heap would then quietly host the step's big tensors and hide them from the RSS.
        top = torch.stack([torch.randperm(VOCAB)[:k].clone() for _ in range(b * t)]).view(b, t, k)
        probs = torch.rand(b, t, k)
        probs = probs / probs.sum(-1, keepdim=True) * 0.9
        return SparseDist(top.int().to(device), probs.to(device), (1 - probs.sum(-1)).to(device))

    t32, t64, prior64 = targets(32), targets(64), targets(64)
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    losses = {
        "sft-hf": lambda z: F.cross_entropy(z.float().view(-1, VOCAB), shifted, reduction="sum"),
        "sft": lambda z: objective(z, labels).loss,
        "kd-K32": lambda z: objective(z, labels, target=t32, beta=1.0).loss,
        "kd-K64": lambda z: objective(z, labels, target=t64, beta=1.0).loss,
        "kd-prior+post-K64": lambda z: objective(z, labels, prior64, t64, alpha=1.0, beta=1.0).loss,
    }
    return model, optimizer, ids, losses


def step(model, optimizer, ids, loss_fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one training step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    loss_fn(model(input_ids=ids, use_cache=False).logits).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(args: argparse.Namespace) -> None:
    """Print the peak RSS (MiB) of a step of `args.memory_child` above the RSS at rest before it.

    A thread samples VmRSS every millisecond: the kernel's VmHWM is only refreshed at some
    unmaps, so it misses transient peaks.
    """
    model, optimizer, ids, losses = build(args, torch.device("cpu"))
    step(model, optimizer, ids, losses[args.memory_child], torch.device("cpu"))  # optimizer state, warm caches
    before, peak, done = _proc_status_kib("VmRSS"), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _proc_status_kib("VmRSS"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(3):  # the largest of three steps: a 1 ms sampler can still miss a short peak
        step(model, optimizer, ids, losses[args.memory_child], torch.device("cpu"))
    done.set()
    sampler.join()
    print((peak[0] - before) / 1024)


def cpu_peak_mib(args: argparse.Namespace, name: str) -> float | None:
    """Peak RSS of a step of one configuration, measured in a fresh process so that neither the
    other configurations' freed memory nor their high-water marks count. None without /proc."""
    if _proc_status_kib("VmRSS") is None:
        return None
    cmd = [sys.executable, __file__, "--memory-child", name, "--threads", str(args.threads)]
    for key in ("batch", "seq", "hidden", "layers"):
        cmd += [f"--{key}", str(getattr(args, key))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def timings(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    model, optimizer, ids, losses = build(args, device)
    wall: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}
    peak: dict[str, float] = {}
    for rep in range(args.reps + 1):  # round 0 warms up (allocator, kernels) and is not timed
        for name in CONFIGS:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            w, c = step(model, optimizer, ids, losses[name], device)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), (torch.cuda.max_memory_allocated() - before) / 2**20)
            if rep:
                wall[name].append(w)
                cpu[name].append(c)
        print(f"round {rep}/{args.reps} done", file=sys.stderr, flush=True)
    tokens = args.batch * args.seq
    return {
        name: {
            "step_s_median": statistics.median(wall[name]),
            "step_s_min": min(wall[name]),
            "cpu_s_median": statistics.median(cpu[name]),
            "tokens_per_s": tokens / statistics.median(wall[name]),
            "peak_mib": peak[name] if device.type == "cuda" else cpu_peak_mib(args, name),
        }
        for name in CONFIGS
    }


def report(args: argparse.Namespace, device: torch.device, results: dict[str, dict]) -> None:
    stats = ("step_s_median", "step_s_min", "cpu_s_median")
    for r in results.values():
        r["x_sft_hf"] = {s: r[s] / results["sft-hf"][s] for s in stats}
        r["x_sft"] = {s: r[s] / results["sft"][s] for s in stats}
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch}x{args.seq} V={VOCAB} "
          f"hidden={args.hidden} layers={args.layers} reps={args.reps}")  # fmt: skip
    print("x = this step / the SFT step, on: median wall time / fastest wall time / median CPU time")
    print(f"{'config':<19}{'tok/s':>7}{'wall ms':>9}{'min ms':>8}{'cpu ms':>8}"
          f"{'x sft-hf':>20}{'x sft':>20}{'peak MiB':>10}")  # fmt: skip
    for name, r in results.items():
        peak = f"{r['peak_mib']:>10.0f}" if r["peak_mib"] is not None else f"{'n/a':>10}"
        x_hf = " / ".join(f"{r['x_sft_hf'][s]:.2f}" for s in stats)
        x = " / ".join(f"{r['x_sft'][s]:.2f}" for s in stats)
        print(f"{name:<19}{r['tokens_per_s']:>7.0f}{1e3 * r['step_s_median']:>9.0f}{1e3 * r['step_s_min']:>8.0f}"
              f"{1e3 * r['cpu_s_median']:>8.0f}{x_hf:>20}{x:>20}{peak}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/out/train.json")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    device = torch.device(args.device)
    results = timings(args, device)
    report(args, device, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "memory_child")}
    record = {"device": str(device), "threads": torch.get_num_threads(), "vocab": VOCAB, "settings": settings}
    out.write_text(json.dumps(record | {"results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
