"""Search spaces: a system's ``search_space`` class attribute → Optuna suggestions.

Format (one entry per ``__init__`` argument of the system)::

    {"lambda_": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
     "width":   {"type": "categorical", "choices": [8, 16]},
     "n":       {"type": "int", "low": 1, "high": 4, "step": 1}}
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["SpaceError", "check_space", "suggest", "space_of"]

_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


class SpaceError(ValueError):
    """A malformed search space; the message names the parameter."""


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
        if allowed is not None and name not in allowed:
            raise SpaceError(f"search_space.{name}: not an argument of {cls.__name__}")


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One value per parameter from an ``optuna.Trial``; returns ``{name: value}``."""
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
    return out


def space_of(cls: type, override: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The system's declared space (or ``override``), checked."""
    space = dict(override) if override else dict(getattr(cls, "search_space", {}) or {})
    check_space(space, cls)
    return space
