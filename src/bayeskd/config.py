"""Typed configuration: one dataclass per section, loaded from YAML plus dotted overrides.

The sections live with their subsystems (`teachers/config.py`, `estimate/config.py`,
`train/config.py`, `evaluate/config.py`), the only home of defaults and of the help text for
every option; this module holds the whole run's `Config` and the one loader.
A YAML file holds only the values that differ from the defaults; on the command line,
``collect.max_tokens=64`` overrides one field (the value is parsed as YAML, so
``'collect.stop=["\\n\\n"]'`` and ``teacher.base_url=null`` work too).

Every error names the offending field by its dotted path and shows the bad value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bayeskd.errors import ConfigError, check
from bayeskd.estimate.config import PosteriorConfig, PriorConfig, ProbeConfig
from bayeskd.evaluate.config import EvalConfig
from bayeskd.teachers.config import CollectConfig, ServeConfig, TeacherConfig
from bayeskd.train.config import DataConfig, DistillConfig, ProxyConfig


@dataclass
class Config:
    """A whole run: where it lives, its seed, the teacher, and one section per stage."""

    run_dir: str = "runs/default"
    """Folder of the run: one sub-folder per stage, each with a manifest."""
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    @property
    def student_model(self) -> str:
        """The student's model reference: its tokenizer is the one every token-level quantity uses."""
        return self.distill.train.model

    @property
    def target_stage(self) -> str:
        """The stage whose `targets/` the Bayesian students train on: `probe` when it spends a budget."""
        return "probe" if self.probe.budget_tokens is not None else "posterior"

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        t = self.teacher
        check(self.collect.mode == "online" or (t.backend == "openai" and t.endpoint == "chat"), "collect.mode",
              self.collect.mode, "a Batch API is reached through an OpenAI-compatible endpoint: needs teacher.backend=openai "
              f"and teacher.endpoint=chat (here {t.backend}, {t.endpoint})")  # fmt: skip
        return self


# ---------------------------------------------------------------- loading and overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check (and minimally coerce) `value` against the annotation `tp`, naming `path` on error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}={value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r}: must be one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r}: expected a list")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        return {k: _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()} if args else dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")  # a bug in this module, not in the YAML


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}={data!r}: expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for key in unknown:
        if key in getattr(cls, "RENAMED", {}):
            raise ConfigError(f"{path + '.' if path else ''}{key}: {cls.RENAMED[key]}")
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; {cls.__name__} has: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                # A partial section overrides the field's own defaults, not the bare class's.
                value = _deep_merge(dataclasses.asdict(default), value)
        kwargs[f.name] = _coerce(value, hints[f.name], f"{path}.{f.name}" if path else f.name)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`collect.max_tokens=64` -> ("collect.max_tokens", 64). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. collect.max_tokens=64")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={raw!r}: not a valid YAML value ({e})") from e
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides, validate."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "").validate()


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
