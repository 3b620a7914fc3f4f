"""The run config, checked once: :func:`load_config` turns a composed config (or a plain mapping,
from a notebook) into plain containers that fit :class:`~approxrun.config.schema.RunConfig`, every
value in its range, and :func:`stage_configs` gives the complete settings of each stage to run.

Every mistake is a :class:`ConfigError`: one line naming the key, the value and what is expected.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Mapping, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from approxrun.config.schema import RunConfig, TrainingStage
from approxrun.errors import ConfigError, one_line

log = logging.getLogger("approxrun")

__all__ = ["ConfigError", "load_config", "stage_configs", "complete", "to_container", "omegaconf_message"]


def omegaconf_message(exc: BaseException, prefix: str = "") -> str:
    """One line for an OmegaConf error: the key it names (with ``prefix``) and the problem."""
    key = getattr(exc, "full_key", None)
    message = one_line(getattr(exc, "msg", None) or exc)
    return f"{prefix}{key}: {message}" if key else (f"{prefix.rstrip('.')}: {message}" if prefix else message)


def to_container(cfg, schema: type | None = None, where: str = "", missing_ok: bool = False) -> dict:
    """``cfg`` merged into ``schema`` (unknown keys and wrong types refused), interpolations resolved."""
    try:
        node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(_plain(cfg))
        if schema is not None:
            node = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=not missing_ok)
    except OmegaConfBaseException as exc:
        raise ConfigError(omegaconf_message(exc, where)) from None


def _plain(value):
    """Mappings and sequences as dicts and lists (for OmegaConf.create)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def complete(schema: type, values: Mapping, where: str = "") -> dict:
    """``values`` with the schema's defaults filled in (missing mandatory values stay ``'???'``)."""
    return to_container(values, schema, where, missing_ok=True)


def load_config(cfg) -> dict:
    """The run config as plain containers, checked against the schema (see module docstring)."""
    config = to_container(cfg, RunConfig)
    if config.get("checkpoint") is not None:
        log.warning("config key 'checkpoint' is deprecated: use init_weights=PATH (the weights to start from)")
        if config.get("init_weights") is None:
            config["init_weights"] = config["checkpoint"]
    config.pop("checkpoint", None)
    check_ranges(RunConfig, config, lambda key: key)
    return config


def stage_configs(config: Mapping) -> list[dict]:
    """The stages to run, in order, each its kind's settings: the model family's training defaults
    (``model.train.<kind>``) merged with the schedule's entry, checked against the kind's class."""
    from approxrun.stages import stage_kind

    schedule = config["schedule"]
    order, stages = list(schedule.get("order") or []), schedule.get("stages") or {}
    if not order:
        raise ConfigError(f"schedule {schedule.get('name')}: 'order' lists no stages")
    target = config.get("stage")
    if target is not None and target not in order:
        raise ConfigError(f"stage={target}: not a stage of schedule {schedule.get('name')!r} "
                          f"(stages: {', '.join(order)})")
    result = []
    for name in order[: order.index(target) + 1] if target else order:
        if name not in stages:
            raise ConfigError(f"schedule {schedule.get('name')}: stage {name!r} is in 'order' but not in 'stages'")
        entry = dict(stages[name] or {})
        kind = entry.get("kind", name)
        settings = stage_kind(kind).settings
        trains = issubclass(settings, TrainingStage)
        merged = _deep_merge(config["model"]["train"].get(kind, {}), entry) if trains else entry
        merged.update(name=name, kind=kind)
        known = [f.name for f in dataclasses.fields(settings) if f.name not in ("kind", "name")]
        unknown = sorted(set(merged) - {"kind", "name", *known})
        if unknown:
            raise ConfigError(f"schedule.stages.{name}.{unknown[0]}: not a setting of a {kind} stage "
                              f"(expected: {', '.join(known) or 'none'})")
        if trains and "epochs" not in merged:
            raise ConfigError(f"stage {name}: no epochs (set model.train.{kind}.epochs or "
                              f"schedule.stages.{name}.epochs)")
        stage = to_container(merged, settings, f"schedule.stages.{name}.")
        check_ranges(settings, stage, _stage_key(name, kind, trains))
        result.append(stage)
    return result


def _stage_key(name: str, kind: str, trains: bool):
    training_keys = {f.name for f in dataclasses.fields(TrainingStage)}

    def where(key: str) -> str:
        if trains and key.split(".")[0] in training_keys:
            return f"stage {name}: {key}"
        return f"schedule.stages.{name}.{key}"
    return where


def _deep_merge(base: Mapping, override: Mapping) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
            else value
    return out


# ---------------------------------------------------------------------------------------------
# value ranges (declared with ``schema.checked``)


def check_ranges(schema: type, values: Mapping, where, prefix: str = "") -> None:
    """Every field of ``schema`` in ``values`` within its declared range or choices (recursively)."""
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name not in values:
            continue
        value, key = values[f.name], prefix + f.name
        kind = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            check_ranges(kind, value, where, key + ".")
        elif get_origin(kind) is dict and dataclasses.is_dataclass(get_args(kind)[1]) and isinstance(value, Mapping):
            for item_key, item in value.items():
                check_ranges(get_args(kind)[1], item, where, f"{key}.{item_key}.")
        elif value is not None and f.metadata:
            problem = _out_of_range(value, f.metadata, kind)
            if problem:
                optional = "null or " if _is_optional(hints[f.name]) else ""
                raise ConfigError(f"{where(key)}={value!r}: expected {optional}{problem}")


def _out_of_range(value, rules: Mapping, kind) -> str | None:
    """What ``value`` should be, or None when it is fine."""
    choices = rules.get("choices")
    if choices is not None:
        choices = _choices(choices)
        return None if value in choices else f"one of {', '.join(choices)}"
    low, high, low_open = rules.get("low"), rules.get("high"), rules.get("low_open")
    what = "a whole number" if kind is int else "a number"
    if low is not None and high is not None:
        ok, text = low <= value <= high, f"{what} from {_num(low)} to {_num(high)}"
    elif low is not None:
        ok = value > low if low_open else value >= low
        text = f"{what} {'>' if low_open else '>='} {_num(low)}"
    else:
        return None
    return None if ok else text


def _choices(spec) -> tuple[str, ...]:
    """A tuple, or ``"module:NAME"``: the tuple owned by the module implementing the choices."""
    if isinstance(spec, str):
        module, _, name = spec.partition(":")
        return tuple(getattr(importlib.import_module(module), name))
    return tuple(spec)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _is_optional(hint) -> bool:
    return get_origin(hint) is Union and type(None) in get_args(hint)


def _strip_optional(hint):
    if _is_optional(hint):
        return next(arg for arg in get_args(hint) if arg is not type(None))
    return hint

