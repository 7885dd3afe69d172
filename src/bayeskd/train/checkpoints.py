"""Training's checkpoints and final models, written so that a kill at any moment loses at most the
steps since the last save.

A checkpoint (`out_dir/checkpoints/step-XXXXXXXX`) holds accelerate's state (model as
safetensors; optimizer, scheduler and per-process RNG states loaded with
torch.load(weights_only=True)) plus `trainer_state.json`, written last. It is written to a
`.tmp-` folder and renamed into place, so a kill during a save leaves at worst a `.tmp-`
folder, which resume ignores and the next save removes. The final model is a normal Hugging
Face folder (`out_dir/final`); with LoRA the adapters are merged into it and also kept alone in
`out_dir/final/adapter`. A finished stage drops its checkpoints (`artifacts.Run.finish`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from bayeskd.artifacts import CHECKPOINTS, writing

STATE_NAME = "trainer_state.json"  # written last: its presence marks a checkpoint complete


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under out_dir (half-written `.tmp-` folders never count)."""
    done = [p for p in (Path(out_dir) / CHECKPOINTS).glob("step-*") if (p / STATE_NAME).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; the rename is atomic, so readers see old or new."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, state: dict, keep: int) -> None:
    root = out / CHECKPOINTS
    tmp, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"
    main = accelerator.is_main_process
    if main:
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    # A full disk fails the save: the half-written folder goes (its space with it), earlier checkpoints stay.
    with writing(tmp, remove_on_error=tmp if main else None):
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            (tmp / STATE_NAME).write_text(json.dumps({"step": step, **state}))
            replace_dir(tmp, final)
    if main:
        done = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_latest(accelerator: Accelerator, out: Path) -> tuple[int, dict]:
    """Load the latest complete checkpoint, if any: (its step, its trainer state)."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return 0, {}
    accelerator.load_state(str(ckpt))
    state = json.loads((ckpt / STATE_NAME).read_text())
    return int(state["step"]), state


def save_final(
    accelerator: Accelerator, model: Any, out: Path, tokenizer: Any, lora: bool, name: str = "final"
) -> tuple[Any, Path]:
    """Save a plain Hugging Face folder out/name (LoRA merged, adapters beside it); returns (model, folder).

    With LoRA the returned model is merged; call it for `final` only, after the last step."""
    final, tmp = out / name, out / f".tmp-{name}"
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        if lora:
            unwrapped.save_pretrained(tmp / "adapter")
    if lora:
        unwrapped = unwrapped.merge_and_unload() if name == "final" else merged_copy(unwrapped)
        state_dict = unwrapped.state_dict()
    else:
        state_dict = accelerator.get_state_dict(model)  # every process: gathers FSDP / ZeRO-3 shards
    if main:  # one writer: several processes writing the same files would race
        with writing(tmp, remove_on_error=tmp):
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return unwrapped.eval(), final


def merged_copy(peft_model: Any) -> Any:
    """A merged copy of a LoRA model that leaves the one in training untouched (a mid-run save)."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()
