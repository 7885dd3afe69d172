"""The CUDA path: the fused KD loss in bf16 against a float64 reference, and bayeskd's training
loop (accelerate, mixed precision `auto` -> bf16) on a student of SmolLM2-135M's shape.

    python bench/gpu.py [--steps 30] [--batch 8] [--seq 512] [--out bench/out/gpu.json]

Needs a CUDA device; CI never runs it (the test suite covers the same code on CPU).

1. Loss: `objective(logits, labels, target=K-sparse targets, beta=1)` on bf16 logits
   [1, T, 49152] on the GPU, against the same loss computed in float64 with plain autograd:
   relative error of the loss and of the gradient (max |diff| / max |grad|).
2. Training: `bayeskd.train.loop.train` (the loop every stage uses) on a Llama built from
   config with SmolLM2-135M's shape (30 layers, hidden 576, V = 49152, random init: this
   measures the machinery, not a model), for `--steps` optimizer steps on 16 fixed rows
   (memorised, so the loss must fall) in three settings: SFT in bf16, KD (CE + K=32 sparse
   posterior targets) in bf16, SFT in fp32. Reported: median tokens/s over the steps after
   the first five, the peak GPU memory, and the first and last loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bayeskd.train.config import TrainConfig  # noqa: E402
from bayeskd.estimate.distributions import SparseDist  # noqa: E402
from bayeskd.data import IGNORE_INDEX  # noqa: E402
from bayeskd.train.losses import make_loss_fn, objective
from bayeskd.train.loop import train  # noqa: E402

VOCAB = 49152
K = 32


def sparse_targets(shape: tuple[int, ...], device: torch.device, gen: torch.Generator) -> SparseDist:
    """Random K-sparse distributions: K distinct ids per position, 90% of the mass on them."""
    n = int(torch.tensor(shape).prod())
    ids = torch.stack([torch.randperm(VOCAB, generator=gen)[:K] for _ in range(n)]).view(*shape, K)
    probs = torch.rand(*shape, K, generator=gen)
    probs = probs / probs.sum(-1, keepdim=True) * 0.9
    return SparseDist(ids.int().to(device), probs.to(device), (1 - probs.sum(-1)).to(device))


def loss_check(device: torch.device, length: int = 2049) -> dict:
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(1, length, VOCAB, generator=gen)).to(device, torch.bfloat16).requires_grad_()
    labels = torch.randint(0, VOCAB, (1, length), generator=gen).to(device)
    labels[0, 0] = IGNORE_INDEX
    t = sparse_targets((1, length), device, gen)
    out = objective(logits, labels, target=t, beta=1.0)
    out.loss.backward()

    # float64 reference: logits row i predicts the label (and its targets) at i + 1
    z = logits.detach().double().requires_grad_()
    lp = F.log_softmax(z[0, :-1], -1)
    ce = -lp.gather(-1, labels[0, 1:, None]).sum()
    ids, p, tail = t.ids[0, 1:].long(), t.probs[0, 1:].double(), t.tail[0, 1:].double()
    q = lp.gather(-1, ids).exp()
    kl = (p * (p.log() - q.log())).sum() + (tail * (tail.log() - torch.log1p(-q.sum(-1)))).sum()
    (ce + kl).backward()
    ref = (ce + kl).item()
    grad_err = (logits.grad.double() - z.grad).abs().max().item() / z.grad.abs().max().item()
    return {"rows": length - 1, "vocab": VOCAB, "k": K, "loss": out.loss.item(), "loss_ref_f64": ref,
            "loss_rel_err": abs(out.loss.item() - ref) / abs(ref), "grad_rel_err": grad_err}  # fmt: skip


def student(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(  # SmolLM2-135M's shape
        vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=100000.0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(device)


def rows(batch: int, seq: int, with_targets: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2 * batch):
        ids = torch.randint(0, VOCAB, (seq,), generator=gen)
        labels = ids.clone()
        labels[: seq // 4] = IGNORE_INDEX  # the prompt
        row = {"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels}
        if with_targets:
            t = sparse_targets((seq,), torch.device("cpu"), gen)
            row |= {"target_ids": t.ids, "target_probs": t.probs, "target_tail": t.tail}
        out.append(row)
    return out


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def train_check(args: argparse.Namespace, device: torch.device, name: str, precision: str, kd: bool) -> dict:
    cfg = TrainConfig(batch_size=args.batch, max_steps=args.steps, lr=1e-3, warmup_steps=2, schedule="constant",
                      mixed_precision=precision, save_every=0, log_every=1)  # fmt: skip
    model = student(device)
    loss_fn = make_loss_fn(lambda_ce=1.0, beta=1.0 if kd else 0.0)
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        train(model, rows(args.batch, args.seq, kd), loss_fn, cfg, tmp, collate_fn=collate, progress=False)
        log = [json.loads(line) for line in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in log[5:]]
    return {"name": name, "mixed_precision": precision, "kd": kd, "steps": len(log),
            "tokens_per_s": statistics.median(steady), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--out", default="bench/out/gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device; this machine has none")
    device = torch.device("cuda")
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "settings": vars(args)}
    record["loss"] = loss_check(device)
    print(json.dumps(record["loss"]))
    record["train"] = [
        train_check(args, device, "sft-bf16", "auto", kd=False),
        train_check(args, device, "kd-K32-bf16", "auto", kd=True),
        train_check(args, device, "sft-fp32", "no", kd=False),
    ]
    base = record["train"][0]["tokens_per_s"]
    print(f"\n{record['device']}, student of SmolLM2-135M's shape, batch {args.batch}x{args.seq}, {args.steps} steps")
    print(f"{'run':<14}{'tokens/s':>10}{'step vs sft-bf16':>18}{'peak GiB':>10}{'loss first':>12}{'last':>8}")
    for r in record["train"]:
        print(f"{r['name']:<14}{r['tokens_per_s']:>10.0f}{base / r['tokens_per_s']:>17.3f}x{r['peak_gib']:>10.2f}"
              f"{r['first_loss']:>12.3f}{r['last_loss']:>8.3f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
