"""Shared fixtures: a tiny causal LM built from config, a small corpus of records, and a loopback
server that records what a client sends."""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Bench helpers that a short test shares with its benchmark (bench/sigkill.py) import from here.
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))


def make_records(n: int = 24) -> list[dict]:
    """Corpus records as `collect` writes them: two samples per prompt, one unfinished response in five."""
    records = []
    for i in range(n):
        a = i // 2
        records.append(
            {
                "key": f"k{i}",
                "prompt_id": f"p{a}",
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {a} plus {a}?"}],
                "sample_index": i % 2,
                "text": f"{a} plus {a} is {2 * a}." + (" It is even." if i % 2 else ""),
                "finish_reason": "length" if i % 5 == 4 else "stop",
                "answer": str(2 * a),
                "tokens": None,
                "usage": {},
                "teacher": "test",
            }
        )
    return records


@pytest.fixture
def one_thread():
    """Run torch on one thread: tiny models are dominated by thread hand-offs, more so on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def target_set(tmp_path):
    """make(per_record, k, name): numpy SparseDists by corpus record, written to a real target store; returns its set."""
    import numpy as np

    from bayeskd.estimate.targets import TargetStore, TargetWriter

    def make(per_record: dict, k: int, name: str = "posterior"):
        folder = tmp_path / f"targets-{name}"
        writer = TargetWriter(folder, (name,), k)
        for index, dist in sorted(per_record.items()):
            writer.add(index, {name: dist}, np.zeros(len(dist.ids)))
        writer.close({})
        return TargetStore.open(folder).table(name)

    return make


@pytest.fixture(scope="session")
def corpus_records() -> list[dict]:
    return make_records()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, corpus_records):
    """Folder of a tiny Llama (hidden 16, 2 layers) whose BPE tokenizer was trained on the corpus."""
    from bayeskd.models import build_tiny

    texts = [r["text"] for r in corpus_records] + [m["content"] for r in corpus_records for m in r["messages"]]
    return build_tiny(tmp_path_factory.mktemp("tiny-lm"), texts, vocab_size=300, seed=0)


@pytest.fixture(scope="session")
def teacher_logits(tiny_lm, corpus_records):
    """The tiny LM as a teacher: its logits [P, V] (float64) at every response position of the corpus."""
    import torch

    from bayeskd.data import build_dataset
    from bayeskd.models import load_causal_lm, load_tokenizer

    data = build_dataset(corpus_records, load_tokenizer(str(tiny_lm)), "chat", 128)
    batch = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in data["input_ids"]], batch_first=True)
    with torch.no_grad():
        logits = load_causal_lm(str(tiny_lm))(input_ids=batch).logits
    ends = zip(data["input_ids"], data["n_response"])
    return torch.cat([logits[i, len(x) - n - 1 : len(x) - 1] for i, (x, n) in enumerate(ends)]).double()


TRAIN_SCRIPT = '''"""A tiny training run for tests: python train_script.py SPEC_JSON (also imported with runpy)."""
import json
import sys
import time
from pathlib import Path


def run(spec):
    from accelerate import PartialState

    from bayeskd.train.config import TrainConfig
    from bayeskd.data import Collator, build_dataset
    from bayeskd.train.losses import make_loss_fn
    from bayeskd.models import load_causal_lm, load_tokenizer
    from bayeskd.train.loop import train

    tok = load_tokenizer(spec["model"])
    data = build_dataset(json.loads(Path(spec["records"]).read_text()), tok, "chat", 128)
    cfg = TrainConfig(model=spec["model"], **spec["cfg"])
    inner, calls = make_loss_fn(), [0]

    def loss_fn(logits, batch):
        calls[0] += 1
        if spec.get("stall_after_step") and calls[0] > spec["stall_after_step"] * cfg.grad_accum:
            Path(spec["out"], "stalled").touch()  # the parent SIGKILLs us now
            time.sleep(600)
        return inner(logits, batch)

    result = train(load_causal_lm(spec["model"]), data, loss_fn, cfg, spec["out"],
                   collate_fn=Collator(tok.pad_token_id), tokenizer=tok, progress=False)
    if PartialState().is_main_process:
        Path(spec["out"], "world_size").write_text(str(PartialState().num_processes))
    return result


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
'''


@pytest.fixture
def train_script(tmp_path, tiny_lm, corpus_records):
    """(path of a runnable training script, a function writing its JSON spec for a given out dir and config)."""
    import json

    script = tmp_path / "train_script.py"
    script.write_text(TRAIN_SCRIPT)
    records = tmp_path / "records.json"
    records.write_text(json.dumps(corpus_records))

    def spec(out, **extra) -> tuple[dict, str]:
        s = {"model": str(tiny_lm), "records": str(records), "out": str(out), **extra}
        path = tmp_path / f"spec-{abs(hash(str(out)))}.json"
        path.write_text(json.dumps(s))
        return s, str(path)

    return script, spec


class RecordingServer:
    """A loopback HTTP server that keeps every request's JSON body and answers it with one valid choice
    per `n` (`bayeskd serve` ignores fields it does not know, so it cannot show what it was sent)."""

    def __init__(self):
        bodies = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                bodies.append((self.path, body))
                chat = self.path.endswith("/chat/completions")
                choice = {"message": {"role": "assistant", "content": "ok"}} if chat else {"text": "ok"}
                n = body.get("n", 1)
                answer = {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                          "model": body["model"], "usage": {"prompt_tokens": 3, "completion_tokens": n},
                          "choices": [{"index": i, "finish_reason": "stop", **choice} for i in range(n)]}  # fmt: skip
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.http.shutdown()


@pytest.fixture
def recording_server():
    """`with recording_server() as s:` -- a RecordingServer; `s.bodies` holds (path, JSON body) per request."""
    return RecordingServer
