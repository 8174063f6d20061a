"""Named variants of a method in a grid config (ablations), expanded into experiments.

A method block may carry ``variants``: a mapping of variant name to overrides::

    methods:
      msff:
        class_path: systems.msff.MSFF
        init_args: {lambda_: 1.0, width: 8}
        trainer: {max_steps: 300}
        variants:
          no_aux: {init_args: {aux_decoder: false}}
          concat: {init_args: {fusion: concat}, trainer: {max_steps: 300}}

The base block is the full method (its own row, named ``msff``). Each variant becomes a
method of its own named ``<method>-<variant>`` (``msff-no_aux``, ``msff-concat``): its
``init_args`` are the base's updated key by key with the variant's (a key given in the
variant replaces the base value whole, lists and mappings included), and likewise its
``trainer``. So every variant is an ordinary experiment: its own folder
``<dataset>/<method>-<variant>/seed<k>``, its own resolved config and hash, its own resume
and checkpoint. The resolved config of a variant also records ``variant_of`` (the base
method) and ``variant`` (its name), which the ablation tables read back from ``run.json``.

Names: method and variant names must match ``[A-Za-z0-9_.]+`` (safe folder names, no
``-``, so ``<method>-<variant>`` splits back unambiguously) when variants are used, and an
expanded name must not collide with another method of the config.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["VARIANT_SEP", "NAME_RE", "expand_variants", "variant_name"]

#: Separator between the method and the variant in an expanded method name.
VARIANT_SEP = "-"
#: Allowed method / variant names when variants are used (safe folder names, no separator).
NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")
VARIANT_KEYS = {"init_args", "trainer"}


class VariantError(ValueError):
    """A problem in a ``variants`` block; the message names the key."""


def variant_name(method: str, variant: str) -> str:
    """``<method>-<variant>``: the method name of a variant's experiments."""
    return f"{method}{VARIANT_SEP}{variant}"


def expand_variants(methods: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """Expand every ``variants`` block of a raw ``methods`` mapping.

    Args:
        methods: the config's raw ``methods`` mapping (name → block), not modified.

    Returns:
        ``(blocks, origin)``: every method block without ``variants`` (bases first in
        config order, each base followed by its variants in their order), and for each
        expanded name ``(base method, variant name)``.

    Raises:
        VariantError: naming the key (``methods.<m>.variants.<v>...``) on a bad block, a
            bad name or a name collision.
    """
    out: dict[str, Any] = {}
    origin: dict[str, tuple[str, str]] = {}
    for mname, blk in methods.items():
        if not isinstance(blk, dict) or "variants" not in blk:
            out[mname] = blk
            continue
        where = f"methods.{mname}.variants"
        variants = blk.get("variants")
        base = {k: v for k, v in blk.items() if k != "variants"}
        out[mname] = base
        if variants is None:
            continue
        if not isinstance(variants, dict):
            raise VariantError(f"{where}: expected a mapping of variant name -> {{init_args, trainer}}, got {type(variants).__name__}")
        if not NAME_RE.match(str(mname)):
            raise VariantError(f"methods.{mname}: a method with variants needs a name of letters, digits, '_' or '.' "
                               f"(its variants are named {mname}{VARIANT_SEP}<variant>)")
        for vname, vblk in variants.items():
            vwhere = f"{where}.{vname}"
            if not NAME_RE.match(str(vname)):
                raise VariantError(f"{vwhere}: variant names are letters, digits, '_' or '.' (a safe folder name)")
            vblk = {} if vblk is None else vblk
            if not isinstance(vblk, dict):
                raise VariantError(f"{vwhere}: expected a mapping with init_args and/or trainer, got {type(vblk).__name__}")
            for key in vblk:
                if key not in VARIANT_KEYS:
                    raise VariantError(f"{vwhere}.{key}: unknown key (allowed: {', '.join(sorted(VARIANT_KEYS))})")
            for key in VARIANT_KEYS:
                if not isinstance(vblk.get(key) or {}, dict):
                    raise VariantError(f"{vwhere}.{key}: expected a mapping")
            merged = dict(base)
            merged["init_args"] = {**(base.get("init_args") or {}), **(vblk.get("init_args") or {})}
            trainer = {**(base.get("trainer") or {}), **(vblk.get("trainer") or {})}
            if trainer:
                merged["trainer"] = trainer
            full = variant_name(str(mname), str(vname))
            if full in methods or full in out:
                raise VariantError(f"{vwhere}: the variant's name {full!r} is already a method of the config")
            out[full] = merged
            origin[full] = (str(mname), str(vname))
    return out, origin
