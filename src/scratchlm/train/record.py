"""The run record: ``OUT/run.json`` remembers how a run was started, so ``--resume`` needs no flags.

    write_record(out, "train", options, prepared={...})    # a new run: {"command", "options", "prepared"}
    record = read_record(out, "train")                      # --resume: the recorded options are the base,
    options = merge_given(out, "train", record["options"], given, CHANGEABLE)   # the given ones checked on top

A run is more than its last checkpoint: the data it reads, the tokenizer, the schedule and its length. As in
nanoGPT's ``init_from='resume'``, HF Trainer's ``resume_from_checkpoint`` and litgpt, resuming restores all of
that. The record holds every option with its resolved value (a preset's value or a default written out,
paths made absolute); on ``--resume`` it is the base, and an option given again must either equal the
recorded value or be one of the few that may change (``CHANGEABLE`` of each command: the number of steps,
how often to evaluate, what to print). Anything else is refused with the list of differences, because
"resuming" with another learning rate or context length silently makes a different run.

``scratchlm train`` and ``scratchlm finetune`` both use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scratchlm.errors import ModelFileError, TrainingError
from scratchlm.files import atomic_write_json, read_json

RUN_FILE = "run.json"
VERSION = 1


def plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings): what comparisons use."""
    return json.loads(json.dumps(value, default=str))


def write_record(out: str | Path, command: str, options: dict, **extra: Any) -> Path:
    """Write ``out/run.json`` atomically: the command, its resolved options and ``extra`` (fingerprints)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_FILE
    atomic_write_json(path, {"version": VERSION, "command": command, "options": plain(options), **plain(extra)})
    return path


def read_record(out: str | Path, command: str) -> dict | None:
    """The record of the run in ``out``, or None when there is none (a run from before records existed)."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    if record.get("command") != command or not isinstance(record.get("options"), dict):
        raise ModelFileError(f"{path} records a {record.get('command')!r} run, not a {command!r} run: resume it "
                             f"with `scratchlm {record.get('command')}`, or start a new run in another --out")
    return record


def differences(recorded: dict, given: dict) -> dict[str, tuple[Any, Any]]:
    """``{name: (recorded, given)}`` for every option given (not None) whose value differs from the record."""
    return {name: (recorded.get(name), value) for name, value in given.items()
            if value is not None and plain(value) != plain(recorded.get(name))}


def merge_given(out: Path, command: str, recorded: dict, given: dict, changeable: tuple[str, ...]) -> dict:
    """The recorded options updated by the given ones; a TrainingError lists the differences not allowed.

    Args:
        given: the options the user gave now, None for "not given" (so a flag equal to its default still
            counts as given, and one left out keeps the recorded value).
        changeable: the options that may differ on resume.
    """
    changed = differences(recorded, given)
    refused = {name: pair for name, pair in changed.items() if name not in changeable}
    if refused:
        listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in refused.items())
        raise TrainingError(
            f"cannot resume {out} with other settings ({listed}): the run remembers its data and options, so "
            f"`scratchlm {command} --out {out} --resume` needs no other flags; only {', '.join(changeable)} may "
            f"change on --resume. To train with the new settings, start a new run: another --out, or --force "
            f"to replace this one")
    return {**recorded, **{name: new for name, (_, new) in changed.items()}}


def describe_changes(recorded: dict, merged: dict) -> str:
    """``"max_steps 2000 -> 3000, eval_interval 250 -> 100"`` (empty when nothing changed)."""
    return ", ".join(f"{name} {recorded.get(name)!r} -> {value!r}" for name, value in merged.items()
                     if plain(value) != plain(recorded.get(name)))

