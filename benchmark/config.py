"""Grid configs on ``jsonargparse``: the schema of a ``regbench run`` config, its typed
checks, and the resolved config that ``--print_config`` shows.

Every key of a config has a declared type (:data:`TOP`, :data:`BUDGET`, :data:`TRAINER_RANGES`,
:data:`COUNT_ARG`); ``jsonargparse`` checks each value against it before any work, as
LightningCLI does for its own configs. A ``class_path`` block's ``init_args`` are checked
against the class's ``__init__`` signature (``jsonargparse``'s ``add_class_arguments``, which
also follows ``**kwargs`` to the parent class) and its ``trainer`` against
``lightning.Trainer``'s. A bad value is one :class:`ConfigError` naming the file and the key::

    quick.yaml: trainer.max_steps: expected an integer >= 1 (or -1: no limit), got -5
    quick.yaml: methods.vm.init_args.lamda: unknown argument of VoxelMorph (allowed: ...)

Values keep the form they have in the file: ``jsonargparse`` would read the string ``"5"`` as
an integer, here it is refused (a number is written as a number), and nothing is converted,
so the resolved config (hashed per experiment, see :func:`benchmark.runner.config_hash`) is
the file's own values with the defaults of the config's own keys filled in. Class arguments
are not filled with their defaults there: they are hashed as written, and a finished
experiment keeps its hash.

Importing this module does not import torch: the top-level keys and budgets are checked
without it; a class block imports its class (and so torch) when it is checked.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import inspect
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveInt, restricted_number_type, restricted_string_type

__all__ = ["ConfigError", "Key", "TOP", "BUDGET", "TRAINER_RANGES", "BLOCK_KEYS", "read_config", "resolve_top", "check_budget",
           "check_init_args", "check_trainer", "check_dataset_counts", "apply_overrides", "expand_env", "class_defaults",
           "dump_config"]


class ConfigError(ValueError):
    """A config problem; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its type (checked by ``jsonargparse``), default, meaning, and what a
    value must be (the error message's ``expected ...``)."""

    type: Any
    default: Any
    help: str
    want: str
    required: bool = False


#: An integer >= 1, or -1 for no limit (Lightning's ``max_steps`` / ``max_epochs``).
StepLimit = restricted_number_type("StepLimit", int, [("==", -1), (">=", 1)], join="or")
#: A finite number of seconds > 0.
Seconds = restricted_number_type("Seconds", float, [(">", 0), ("<", math.inf)], join="and")
#: A fraction in (0, 1] and in [0, 1].
Fraction = restricted_number_type("Fraction", float, [(">", 0), ("<=", 1)], join="and")
ClosedFraction = ClosedUnitInterval
#: Lightning's ``devices`` as a string: ``auto``, ``-1`` or device indices ``"0,1"`` (not ``"0"``).
DeviceList = restricted_string_type("DeviceList", r"^(?!\s*0\s*,?\s*$)\s*(-1|auto|\d+\s*(,\s*\d+\s*)*,?)\s*$")

LOGGERS = ("csv", "tensorboard", "wandb")

#: The top-level keys of a grid config.
TOP: dict[str, Key] = {
    "suite": Key(Optional[str], None, "name of the suite (default: the config file's name)", "a string"),
    "output": Key(Optional[str], None, "results folder (default: results/<suite>; --output overrides)", "a path"),
    "seeds": Key(List[int], [0], "list of integer seeds", "a non-empty list of integers"),
    "include_initial": Key(Optional[bool], True, "add the no-registration row per dataset", "true or false"),
    "trainer": Key(Optional[Dict[str, Any]], {}, "lightning.Trainer arguments shared by all experiments",
                   "a mapping of lightning.Trainer arguments"),
    "loggers": Key(Optional[List[Literal[LOGGERS]]], ["csv"], "list of: " + ", ".join(LOGGERS),
                   "a list of: " + ", ".join(LOGGERS)),
    "wandb": Key(Optional[Dict[str, Any]], {}, "WandbLogger options (offline unless offline: false)", "a mapping"),
    "datasets": Key(Dict[str, Any], None, "name -> {class_path, init_args}", "a non-empty mapping of name -> block", True),
    "methods": Key(Dict[str, Any], None, "name -> {class_path, init_args, trainer, budget, variants}",
                   "a non-empty mapping of name -> block", True),
    "arc": Key(Optional[Dict[str, Any]], None, "options of `regbench arc` (k, sdlogj_bound, per-method ranges); "
               "ignored by `regbench run`", "a mapping"),
    "budget": Key(Optional[Dict[str, Any]], None, "training budget of every learned method: {max_steps, max_time_s} "
                  "(a method's own budget overrides it)", "a mapping with max_steps and/or max_time_s, or null"),
    "checkpoint_every_n_steps": Key(PositiveInt, 50, "training steps between resumable checkpoints (ckpt/last.ckpt)",
                                    "an integer >= 1"),
}
#: A ``budget`` block (top level or a method's own).
BUDGET: dict[str, Key] = {
    "max_steps": Key(Optional[PositiveInt], None, "training steps", "an integer >= 1 (training steps) or null"),
    "max_time_s": Key(Optional[Seconds], None, "training seconds", "a positive number of seconds or null"),
}
#: Trainer values whose type in Lightning's signature lets through what fails (or silently
#: does nothing) at run time: the range each must be in.
TRAINER_RANGES: dict[str, Key] = {
    **{k: Key(Optional[StepLimit], None, "", "an integer >= 1 (or -1: no limit)") for k in ("max_steps", "max_epochs")},
    **{k: Key(Optional[NonNegativeInt], None, "", "an integer >= 0") for k in ("min_steps", "min_epochs")},
    **{k: Key(PositiveInt, None, "", "an integer >= 1") for k in ("num_nodes", "accumulate_grad_batches", "log_every_n_steps")},
    "check_val_every_n_epoch": Key(Optional[PositiveInt], None, "", "an integer >= 1 or null"),
    "devices": Key(Union[StepLimit, DeviceList, List[NonNegativeInt]], None, "",
                   "an integer >= 1, -1 (all), 'auto', or a list of device indices"),
    **{k: Key(Optional[Union[Fraction, PositiveInt]], None, "", "a batch count >= 1 or a fraction in (0, 1]")
       for k in ("limit_train_batches", "limit_test_batches")},
    "limit_val_batches": Key(Optional[Union[ClosedFraction, NonNegativeInt]], None, "", "a batch count >= 0 or a fraction in [0, 1]"),
    "val_check_interval": Key(Optional[Union[Fraction, PositiveInt]], None, "", "a step count >= 1 or a fraction in (0, 1]"),
}
#: Dataset arguments that count things: null or an integer >= 1 (``num_workers``: >= 0).
COUNT_ARG = re.compile(r"^(n_\w+|max_\w+|\w*_pairs|\w*_pairs_per_epoch|batch_size)$")
COUNT = Key(Optional[PositiveInt], None, "", "an integer >= 1 (or null)")
WORKERS = Key(NonNegativeInt, 0, "", "an integer >= 0")
#: The keys of a dataset / method block (methods also take ``variants``, see :mod:`benchmark.variants`).
BLOCK_KEYS = ("class_path", "init_args", "trainer", "budget")

_ERROR_KEY = re.compile(r"""Parser key "([^"]+)"|accept option '([^']+)'|Option '([^']+)' is not accepted|"""
                        r"""arguments are required: ([\w.]+)""")


# ----------------------------------------------------------------------------- checking
def _parser(keys: dict[str, Key]) -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False)
    for name, k in keys.items():
        p.add_argument(f"--{name}", type=k.type, default=k.default, required=k.required, help=k.help)
    return p


@functools.lru_cache(maxsize=None)
def _key_parser(section: str) -> ArgumentParser:
    return _parser({"top": TOP, "budget": BUDGET, "trainer_ranges": TRAINER_RANGES}[section])


@functools.lru_cache(maxsize=None)
def _value_parser(key: Key) -> ArgumentParser:
    return _parser({"v": key})


def _kept(raw: Any, parsed: Any) -> bool:
    """Whether ``jsonargparse`` took ``raw`` as it is: it reads ``"5"`` as 5, ``"yes"`` as true
    and ``5.0`` as 5, which a config must write as what they are (an int where a float is
    expected is fine: it is not converted here either)."""
    if isinstance(parsed, bool):
        return isinstance(raw, bool)
    if isinstance(parsed, (int, float)):
        return not isinstance(raw, bool) and isinstance(raw, (int, float)) and not (isinstance(parsed, int) and isinstance(raw, float))
    if isinstance(parsed, (list, tuple, dict)) and isinstance(raw, str):
        return False
    if isinstance(parsed, (list, tuple)) and isinstance(raw, (list, tuple)) and len(raw) == len(parsed):
        return all(_kept(r, q) for r, q in zip(raw, parsed))
    if isinstance(parsed, dict) and isinstance(raw, dict):
        return all(_kept(raw[k], parsed[k]) for k in raw if k in parsed)
    return True


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse(parser: ArgumentParser, obj: dict[str, Any], where: str, want: typing.Callable[[str], str], strip: str = "") -> Any:
    """``parser.parse_object(obj)``, or a :class:`ConfigError` naming ``where.<key>`` (``strip``
    taken off the key) and what the key's value must be (``want(key)``)."""
    try:
        ns = parser.parse_object(copy.deepcopy(obj))  # it turns nested mappings into Namespaces in place
    except argparse.ArgumentError as exc:
        m = _ERROR_KEY.search(str(exc))
        key = next((g for g in m.groups() if g), None) if m else None
        if key is None:
            raise ConfigError(f"{where}: {str(exc).splitlines()[0]}") from None
        node: Any = obj
        for part in key.split("."):
            node = node.get(part, None) if isinstance(node, dict) else None
        name = key.removeprefix(strip)
        full = f"{where}.{name}" if where else name
        if m.group(4):
            raise ConfigError(f"{full}: missing ({want(key)} is required)") from None
        raise ConfigError(f"{full}: expected {want(key)}, got {_got(node)}") from None
    return ns


def _check_value(value: Any, key: Key, where: str) -> Any:
    try:
        ns = _value_parser(key).parse_object({"v": copy.deepcopy(value)})
    except argparse.ArgumentError:
        raise ConfigError(f"{where}: expected {key.want}, got {_got(value)}") from None
    if not _kept(value, ns.v):
        raise ConfigError(f"{where}: expected {key.want}, got {_got(value)}")
    return value


def _check_kept(obj: dict[str, Any], ns: Any, where: str, want: typing.Callable[[str], str], prefix: str = "") -> None:
    for k, v in obj.items():
        if not _kept(v, ns.get(prefix + k)):
            raise ConfigError(f"{where}.{k}: expected {want(k)}, got {_got(v)}" if where else f"{k}: expected {want(k)}, got {_got(v)}")


def check_budget(raw: Any, where: str) -> dict[str, Any] | None:
    """A ``budget`` block → ``{max_steps: int | None, max_time_s: float | None}`` (None: no block)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with max_steps and/or max_time_s, got {_got(raw)}")
    for key in raw:
        if key not in BUDGET:
            raise ConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(BUDGET)})")
    ns = _parse(_key_parser("budget"), raw, where, lambda k: BUDGET[k].want)
    _check_kept(raw, ns, where, lambda k: BUDGET[k].want)
    secs = raw.get("max_time_s")
    return {"max_steps": raw.get("max_steps"), "max_time_s": None if secs is None else float(secs)}


def _annotation(cls: type, name: str) -> Any:
    """The type of ``name`` in ``cls.__init__`` (or, through ``**kwargs``, a parent's)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or name not in inspect.signature(init).parameters:
            continue
        try:
            return typing.get_type_hints(init).get(name, Any)
        except Exception:  # an annotation that names something not importable here
            return inspect.signature(init).parameters[name].annotation
    return Any


def describe(tp: Any) -> str:
    """A type in words: ``Optional[int]`` → ``an integer or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, set, frozenset) or (origin is not None and getattr(origin, "__name__", "") in ("Sequence", "Iterable")):
        items = {a for a in args if a is not Ellipsis}
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        # tuple[int, int, int] takes exactly three: say so, or "got [16, 16]" reads as valid
        count = f"{len(args)} " if origin is tuple and args and Ellipsis not in args else ""
        return "a list" + (f" of {count}{plural[next(iter(items))]}" if len(items) == 1 and next(iter(items)) in plural else "")
    if origin is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "any value"}
    if tp in names:
        return names[tp]
    name = getattr(tp, "__name__", str(tp))
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


@functools.lru_cache(maxsize=None)
def _class_schema(cls: type) -> tuple[ArgumentParser, tuple[str, ...], bool]:
    """``cls``'s ``init_args`` parser, its argument names, and whether it takes any keyword
    (``**kwargs`` that ``jsonargparse`` could not follow)."""
    p = ArgumentParser(exit_on_error=False)
    p.add_class_arguments(cls, "init_args", fail_untyped=False, instantiate=False)
    defaults = p.get_defaults().get("init_args")
    found = set(defaults.keys()) if defaults is not None else set()
    found = {k.split(".", 1)[0] for k in found}
    params = inspect.signature(cls.__init__).parameters
    named = {k for k, q in params.items() if k != "self" and q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)}
    open_ = any(q.kind == q.VAR_KEYWORD for q in params.values()) and not (found - named)
    return p, tuple(sorted(found | named)), open_


def check_init_args(cls: type, init_args: Any, where: str, counts: bool = False) -> None:
    """``init_args`` of a ``class_path`` block against ``cls``'s signature: unknown argument,
    wrong type or missing required argument → :class:`ConfigError` naming
    ``<where>.init_args.<key>``. ``counts``: a data module's count arguments
    (:data:`COUNT_ARG`, ``num_workers``) must also be in range."""
    if not isinstance(init_args, dict):
        raise ConfigError(f"{where}.init_args: expected a mapping, got {_got(init_args)}")
    parser, allowed, open_ = _class_schema(cls)
    if not open_:
        for key in init_args:
            if key not in allowed:
                raise ConfigError(f"{where}.init_args.{key}: unknown argument of {cls.__name__} (allowed: {', '.join(allowed)})")
    known = {k: v for k, v in init_args.items() if k in allowed}

    def want(key: str) -> str:
        return describe(_annotation(cls, key.removeprefix("init_args.").split(".")[0]))

    ns = _parse(parser, {"init_args": known}, where, want)
    _check_kept(known, ns, f"{where}.init_args", want, prefix="init_args.")
    if counts:
        check_dataset_counts(init_args, where)


def check_dataset_counts(init_args: dict[str, Any], where: str) -> None:
    """A data module's count arguments: ``n_*``, ``max_*``, ``*_pairs``, ``batch_size`` ≥ 1 or
    null, ``num_workers`` ≥ 0."""
    for key, v in init_args.items():
        if COUNT_ARG.match(key):
            _check_value(v, COUNT, f"{where}.init_args.{key}")
        elif key == "num_workers":
            _check_value(v, WORKERS, f"{where}.init_args.{key}")


def check_trainer(trainer: Any, where: str) -> dict[str, Any]:
    """``trainer`` arguments against ``lightning.Trainer``'s signature (types) and
    :data:`TRAINER_RANGES` (ranges); imports lightning."""
    if trainer is None:
        return {}
    if not isinstance(trainer, dict):
        raise ConfigError(f"{where}: expected a mapping of lightning.Trainer arguments, got {_got(trainer)}")
    import lightning as L

    parser, allowed, _ = _class_schema(L.Trainer)
    for key in trainer:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: not a lightning.Trainer argument")
    ranged = {k: v for k, v in trainer.items() if k in TRAINER_RANGES}
    for key, v in ranged.items():
        _check_value(v, TRAINER_RANGES[key], f"{where}.{key}")
    if "devices" in ranged and isinstance(ranged["devices"], list) and not ranged["devices"]:
        raise ConfigError(f"{where}.devices: expected {TRAINER_RANGES['devices'].want}, got []")

    def want(key: str) -> str:
        return describe(_annotation(L.Trainer, key.removeprefix("init_args.").split(".")[0]))

    rest = {k: v for k, v in trainer.items() if k not in TRAINER_RANGES}
    ns = _parse(parser, {"init_args": rest}, where, want, strip="init_args.")
    _check_kept(rest, ns, where, want, prefix="init_args.")
    return dict(trainer)


# ----------------------------------------------------------------------------- reading
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (value parsed as YAML) to a raw config mapping.

    Intermediate mappings are created when missing; a key that runs into a non-mapping is
    an error naming it.
    """
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, _, text = item.partition("=")
        parts = [k for k in key.strip().split(".") if k]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value is not valid YAML ({exc})") from exc
        node = raw
        for i, k in enumerate(parts[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return raw


def expand_env(value: Any, where: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a config, recursively."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        got = os.environ.get(name)
        if got is None or got == "":
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {name} is not set "
                              f"(export {name}=..., or pass --set {where}=VALUE)")
        return got

    return _ENV_REF.sub(sub, value)


def read_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw mapping of a grid config file, ``--set`` overrides applied, then environment
    variables expanded; :class:`ConfigError` on a missing / unreadable / non-YAML file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder, not a config file (give the YAML file, e.g. benchmark/configs/quickstart.yaml)")
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (expected a YAML grid config)") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return expand_env(apply_overrides(raw, overrides))


def resolve_top(raw: dict[str, Any], path: str | os.PathLike, output: str | None = None) -> dict[str, Any]:
    """Check every top-level key of a raw config (:data:`TOP`; the budget's own keys too) and
    return the config with the defaults of its own keys filled in: ``suite`` (the file's
    name), ``output``, ``seeds``, ``include_initial``, ``trainer``, ``loggers``, ``wandb``,
    ``budget`` (``{max_steps, max_time_s}`` or null), ``checkpoint_every_n_steps``. Blocks
    (``datasets``, ``methods``) are returned as written; they are checked with their classes."""
    for key in raw:
        if key not in TOP:
            raise ConfigError(f"unknown key {key!r} at the top level (allowed: {', '.join(sorted(TOP))})")
    for key in ("datasets", "methods"):
        if not raw.get(key) or not isinstance(raw[key], dict):
            raise ConfigError(f"{key}: expected {TOP[key].want}, got {_got(raw.get(key))}")
    ns = _parse(_key_parser("top"), raw, "", lambda k: TOP[k].want)
    # mappings are checked key by key with their classes (jsonargparse would read their strings as YAML here)
    _check_kept({k: v for k, v in raw.items() if not isinstance(v, dict)}, ns, "", lambda k: TOP[k].want)
    if not raw.get("seeds", [0]):
        raise ConfigError(f"seeds: expected {TOP['seeds'].want}, got []")
    suite = str(raw.get("suite") or Path(path).stem)
    out = {
        "suite": suite,
        "output": str(output or raw.get("output") or Path("results") / suite),
        "seeds": list(raw.get("seeds", [0])),
        "include_initial": bool(raw.get("include_initial", True)),
        "checkpoint_every_n_steps": raw.get("checkpoint_every_n_steps", 50),
        "loggers": list(raw.get("loggers") or ["csv"]),
        "wandb": dict(raw.get("wandb") or {}),
        "trainer": dict(raw.get("trainer") or {}),
        "budget": check_budget(raw.get("budget"), "budget"),
        "datasets": raw["datasets"],
        "methods": raw["methods"],
    }
    if raw.get("arc") is not None:
        out["arc"] = raw["arc"]
    return out


def class_defaults(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """The defaults of ``cls``'s arguments that ``given`` does not set (as ``jsonargparse``
    reads the signature; arguments without a default are left out)."""
    defaults = _class_schema(cls)[0].get_defaults().get("init_args")
    items = dict(defaults.items()) if defaults is not None else {}
    return {k: v for k, v in items.items() if "." not in k and k not in given}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def dump_config(resolved: dict[str, Any], defaults: dict[str, dict[str, Any]] | None = None) -> str:
    """The resolved config as YAML (``--print_config``), in :data:`TOP`'s order; ``defaults``
    (block → its class's defaults not set in the block) follow as YAML comments: they are not
    part of the config (nor of its hash) until written into ``init_args``."""
    ordered = {k: resolved[k] for k in TOP if k in resolved}
    text = yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None, width=120)
    notes = [f"#   {where}: " + yaml.safe_dump(_plain(values), default_flow_style=True, sort_keys=False, width=10**6).strip()[1:-1]
             for where, values in (defaults or {}).items() if values]
    if notes:
        text += "# Class defaults not set above (write them into init_args to change them):\n" + "\n".join(notes) + "\n"
    return text
