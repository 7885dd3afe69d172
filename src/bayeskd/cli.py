"""`bayeskd`: thin command line. Parses, loads the config, calls a stage."""

from __future__ import annotations

import argparse
import sys

from bayeskd.errors import BayeskdError

_EPILOG = """\
overrides: dotted key=value pairs applied on top of the YAML, values parsed as YAML,
e.g.  collect.max_tokens=64  teacher.base_url=http://127.0.0.1:8000/v1  'collect.stop=["\\n\\n"]'
"""


def _parser() -> argparse.ArgumentParser:
    from bayeskd.stages import STAGES

    p = argparse.ArgumentParser(prog="bayeskd", description=__doc__, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--config", "-c", help="YAML config (only values that differ from the defaults)")
        sp.add_argument("overrides", nargs="*", help="dotted key=value overrides")
        return sp

    verify = "checksum (sha256) every input read from an earlier stage, and every file of a skipped stage"
    for name in STAGES:
        sp = add(name, f"run the {name} stage")
        sp.add_argument("--force", action="store_true", help="rebuild even if done or stale")
        sp.add_argument("--verify", action="store_true", help=verify)
    sp = add("run", "run all stages in order, skipping finished ones")
    sp.add_argument("--force", action="store_true", help="rebuild every stage")
    sp.add_argument("--verify", action="store_true", help=verify)
    add("serve", "serve teacher.model (a local model) as an OpenAI-compatible API on serve.host:serve.port")
    add("config", "print the resolved config")
    sp = add("teacher-check", "probe the teacher.base_url endpoint with a few cheap requests: what a run can rely on")
    sp.add_argument("--positions", type=int, default=256, help="generated tokens whose sampling is compared with the logprobs")
    sp = add("student", "build a tokenizer (trained on the run's training text) and a fresh model at distill.train.model")
    sp.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary, special tokens included")
    sp.add_argument("--hidden-size", type=int, default=128)
    sp.add_argument("--layers", type=int, default=4, help="the proxy's depth; the student keeps distill.train.init_layers")
    sp.add_argument("--heads", type=int, default=4)
    sp.add_argument("--force", action="store_true", help="overwrite a model already there")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BayeskdError as e:
        print(f"bayeskd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("bayeskd: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from bayeskd.config import dump_yaml, load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print(dump_yaml(cfg), end="")
        return 0
    if args.command == "serve":
        from bayeskd.teachers.local import LocalTeacher
        from bayeskd.teachers.hosting import serve

        t = cfg.teacher
        serve(LocalTeacher(t.model, device=t.device, dtype=t.dtype, batch_size=cfg.serve.max_batch), cfg.serve, cfg.serve.model_name)
        return 0

    if args.command == "teacher-check":
        return _teacher_check(cfg, args.positions)

    from bayeskd.artifacts import Run, writing

    if args.command == "student":
        from bayeskd.train.student import build_student

        summary = build_student(cfg, Run(cfg.run_dir), args.vocab_size, args.hidden_size, args.layers, args.heads, args.force)
        _report("student", Run(cfg.run_dir), summary)
        return 0
    from bayeskd.lock import RunLock, describe
    from bayeskd.ranks import Launch
    from bayeskd.stages import RANK0_STAGES, STAGES, stage

    run = Run(cfg.run_dir, verify_checksums=args.verify)
    with RunLock(run.root) as lock:  # one command at a time on a run folder; exit 2 if another holds it
        run.launch = launch = Launch.of(run.root, lock.holder)
        if lock.taken_over:
            print(f"bayeskd: took over the lock of {run.root} from a command that died holding it: "
                  f"{describe(lock.taken_over)}", file=sys.stderr)
        if launch.main:
            run.save_config(to_dict(cfg))
        names = list(STAGES) if args.command == "run" else [args.command]
        try:
            for name in names:
                if launch.main or name not in RANK0_STAGES:
                    with writing(run.root / name):  # a full disk anywhere in the stage: exit 2, naming the path
                        summary = stage(name)(cfg, run, args.force)
                # Under `accelerate launch` every rank goes on once rank 0 has finished (and recorded) the stage.
                launch.broadcast(f"stage {name}")
                if launch.main:
                    _report(name, run, summary)
        except BaseException as e:  # the other ranks stop waiting for this one
            launch.fail(f"{type(e).__name__}: {e}")
            raise
    return 0


def _teacher_check(cfg, positions: int) -> int:
    from bayeskd.prompts import load_prompts
    from bayeskd.teachers.check import check_teacher, print_report

    if cfg.teacher.backend != "openai":
        raise BayeskdError("teacher-check probes an OpenAI-compatible endpoint: "
                           "set teacher.backend=openai and teacher.base_url")
    report = check_teacher(cfg, load_prompts(cfg.collect, cfg.seed)[0]["messages"], positions)
    print_report(report)
    for row in report.failed:
        print(f"bayeskd: teacher-check: {row.name}: {row.found}; {row.note}", file=sys.stderr)
    return 2 if report.failed else 0


def _report(name: str, run, summary: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if summary is None:
        console.print(f"[bold]{name}[/]: already done in {run.root / name} (skipped; --force rebuilds)")
        return
    if "off" in summary:  # an optional stage that is not configured
        console.print(f"[bold]{name}[/]: off ({summary['off']})")
        return
    if "table" in summary:  # eval: the comparison table, then where the report is
        from rich.markdown import Markdown

        console.print(Markdown(summary["table"]))
        console.print(f"report: {summary['report']}")
        return
    # A stage with sub-stages (distill: one student per mode) reports one table each.
    parts = summary.items() if all(isinstance(v, dict) for v in summary.values()) else [(None, summary)]
    for sub, values in parts:
        stage = name if sub is None else f"{name}/{sub}"
        status = (run.manifest(stage) or {}).get("status", "?")
        table = Table(title=f"{stage}: {status} ({run.root / stage})", show_header=False)
        for k, v in values.items():
            table.add_row(str(k), f"{v:.4g}" if isinstance(v, float) else str(v))
        console.print(table)


if __name__ == "__main__":
    sys.exit(main())
