"""``_target_`` factories: a config node ``{_target_: "pkg.module.func", **arguments}`` calls
``pkg.module.func(**arguments)``, the convention of Hydra's ``instantiate``.

Implemented with importlib rather than ``hydra.utils.instantiate`` because nothing below the CLI
imports Hydra (``pipeline.run`` is called from notebooks too), and because errors must name the
config key and the target in one line. Nested nodes with their own ``_target_`` are built first,
as Hydra does; ``_partial_``, ``_convert_`` and ``_recursive_`` are not supported.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping

from approxrun.errors import ApproxrunError, ConfigError, one_line


def locate(path: str, key: str) -> Callable:
    """The callable named by a dotted path ``package.module.attribute``; a one-line
    :class:`ConfigError` naming ``key`` when there is none."""
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ConfigError(f"{key}={path}: expected a dotted path module.function")
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                raise ConfigError(f"{key}={path}: importing {module_name} failed: "
                                     f"no module named {exc.name!r}") from None
            continue
        except Exception as exc:  # the user's module itself is broken
            raise ConfigError(f"{key}={path}: importing {module_name} failed ({one_line(exc)})") from None
        for attribute in parts[split:]:
            if not hasattr(obj, attribute):
                raise ConfigError(f"{key}={path}: module {module_name} has no attribute "
                                     f"{'.'.join(parts[split:])!r}")
            obj = getattr(obj, attribute)
        if not callable(obj):
            raise ConfigError(f"{key}={path}: not callable ({type(obj).__name__})")
        return obj
    raise ConfigError(f"{key}={path}: no module named {parts[0]!r} (is it on PYTHONPATH, "
                         "or run from the folder that holds it?)")


def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (explicitly or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               or p.kind is p.VAR_KEYWORD for p in parameters)


def instantiate(node: Mapping, key: str, reserved: tuple[str, ...] = (), offered: Mapping | None = None):
    """Call ``node['_target_']`` with the node's other keys (except ``reserved``) as arguments.

    ``offered`` arguments (e.g. ``num_classes``) are passed only where the factory accepts them and
    the config does not set them.
    """
    fn = locate(node["_target_"], f"{key}._target_")
    arguments = {name: _build(value, f"{key}.{name}") for name, value in node.items()
                 if name != "_target_" and name not in reserved}
    for name, value in (offered or {}).items():
        if name not in arguments and accepts(fn, name):
            arguments[name] = value
    try:
        return fn(**arguments)
    except ApproxrunError:
        raise
    except Exception as exc:
        raise ApproxrunError(f"{key}._target_={node['_target_']}: calling it with "
                             f"{', '.join(sorted(arguments)) or 'no arguments'} failed ({one_line(exc)})") from None


def _build(value, key: str):
    if isinstance(value, Mapping) and "_target_" in value:
        return instantiate(value, key)
    if isinstance(value, Mapping):
        return {k: _build(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_build(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value

