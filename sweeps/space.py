"""Search spaces: a system's ``search_space`` class attribute → Optuna suggestions.

Format (one entry per ``__init__`` argument of the system)::

    {"lambda_": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
     "width":   {"type": "categorical", "choices": [8, 16]},
     "n":       {"type": "int", "low": 1, "high": 4, "step": 1}}

A list-valued argument is searched element by element with indexed names ``"arg.0"``,
``"arg.1"``, ... (indices ``0 .. k-1``, all present): :func:`suggest` and :func:`assemble`
turn them into ``{"arg": [v0, v1, ...]}`` (e.g. DiffOp-net's per-level ``smoothing_mm``).
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["SpaceError", "check_space", "suggest", "space_of", "assemble", "split_name"]

_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


class SpaceError(ValueError):
    """A malformed search space; the message names the parameter."""


def split_name(name: str) -> tuple[str, int | None]:
    """``"arg.2"`` → ``("arg", 2)``; ``"arg"`` → ``("arg", None)``."""
    base, dot, idx = name.rpartition(".")
    if dot and base and idx.isdigit():
        return base, int(idx)
    return name, None


def assemble(params: dict[str, Any]) -> dict[str, Any]:
    """Init arguments from parameter names: indexed names ``"arg.i"`` are gathered into the
    list ``arg`` (in index order); plain names are kept."""
    out: dict[str, Any] = {}
    lists: dict[str, dict[int, Any]] = {}
    for name, value in params.items():
        base, idx = split_name(name)
        if idx is None:
            out[name] = value
        else:
            lists.setdefault(base, {})[idx] = value
    for base, items in lists.items():
        out[base] = [items[i] for i in sorted(items)]
    return out


def check_space(space: dict[str, dict[str, Any]], cls: type | None = None) -> None:
    """Check every entry (type, bounds, keys) and, with ``cls``, that each is an init argument."""
    if not isinstance(space, dict) or not space:
        raise SpaceError("the search space is empty: the system declares no `search_space`")
    allowed = None
    if cls is not None:
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            allowed = set(params) - {"self"}
    for name, spec in space.items():
        if not isinstance(spec, dict) or spec.get("type") not in _KEYS:
            raise SpaceError(f"search_space.{name}: needs 'type' in {sorted(_KEYS)}")
        extra = set(spec) - _KEYS[spec["type"]]
        if extra:
            raise SpaceError(f"search_space.{name}: unknown key(s) {sorted(extra)}")
        if spec["type"] == "categorical":
            if not spec.get("choices"):
                raise SpaceError(f"search_space.{name}: categorical needs non-empty 'choices'")
        else:
            if "low" not in spec or "high" not in spec or not spec["low"] < spec["high"]:
                raise SpaceError(f"search_space.{name}: needs low < high")
            if spec.get("log") and spec["low"] <= 0:
                raise SpaceError(f"search_space.{name}: a log scale needs low > 0")
        base, _ = split_name(name)
        if allowed is not None and base not in allowed:
            raise SpaceError(f"search_space.{name}: not an argument of {cls.__name__}")
    indexed: dict[str, list[int]] = {}
    for name in space:
        base, idx = split_name(name)
        if idx is not None:
            if base in space:
                raise SpaceError(f"search_space.{name}: {base!r} is searched both whole and by element")
            indexed.setdefault(base, []).append(idx)
    for base, idxs in indexed.items():
        if sorted(idxs) != list(range(len(idxs))):
            raise SpaceError(f"search_space.{base}: indexed entries must be {base}.0 .. {base}.{len(idxs) - 1}, "
                             f"got indices {sorted(idxs)}")


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One value per parameter from an ``optuna.Trial``; returns init arguments
    ``{name: value}`` (indexed names gathered into lists by :func:`assemble`)."""
    out: dict[str, Any] = {}
    for name, spec in space.items():
        kind = spec["type"]
        if kind == "float":
            out[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                            log=bool(spec.get("log", False)), step=spec.get("step"))
        elif kind == "int":
            out[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]),
                                          log=bool(spec.get("log", False)), step=int(spec.get("step", 1)))
        else:
            out[name] = trial.suggest_categorical(name, list(spec["choices"]))
    return assemble(out)


def space_of(cls: type, override: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The system's declared space (or ``override``), checked."""
    space = dict(override) if override else dict(getattr(cls, "search_space", {}) or {})
    check_space(space, cls)
    return space
