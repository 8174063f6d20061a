"""The one class-path importer: ``"package.module.Name"`` → the object.

Config blocks (``class_path``), a data module's ``initial_system``, the perf harness's system
table and PatchMorph's ``backbone`` name objects this way. :data:`ALIASES` maps dotted paths
that moved to their new homes, so a saved ``run.json`` or config that names an old path still
loads.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ALIASES", "ClassPathError", "resolve_alias", "import_object"]

#: Old dotted module paths → new ones (longest prefix wins). The ground-floor modules moved
#: from ``benchmark`` to ``benchmark.core`` and the perf harness into ``benchmark.perf``; no
#: saved result names them today, the map keeps any old string valid.
ALIASES: dict[str, str] = {
    **{f"benchmark.{m}": f"benchmark.core.{m}" for m in
       ("spatial", "losses", "metrics", "metrics_pose", "io", "se3", "drr", "timing", "results")},
    "benchmark.perf_systems": "benchmark.perf.systems",
    "benchmark.perf_gpu": "benchmark.perf.gpu",
    "benchmark.perf_training": "benchmark.perf.training",
    "benchmark.perf_drr": "benchmark.perf.drr",
    "benchmark.perf_data": "benchmark.perf.data",
    "benchmark.perf_anatomy": "benchmark.perf.anatomy",
    "benchmark.perf_patchmorph": "benchmark.perf.patchmorph",
}


def resolve_alias(path: str) -> str:
    """``path`` with a moved module prefix replaced by its new home (else unchanged)."""
    for old in sorted(ALIASES, key=len, reverse=True):
        if path == old or path.startswith(old + "."):
            return ALIASES[old] + path[len(old):]
    return path


class ClassPathError(ValueError):
    """A class path that is malformed, names a module that does not import, or a missing name.

    ``reason`` is the message without the caller's prefix; ``kind`` is ``"format"``,
    ``"module"`` or ``"name"``.
    """

    def __init__(self, kind: str, reason: str, module: str | None = None, name: str | None = None) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.module, self.name = kind, reason, module, name


def import_object(path: Any) -> Any:
    """Import ``"package.module.Name"`` (aliases applied) and return ``Name``.

    Raises:
        ClassPathError: ``path`` is not a dotted string (kind ``"format"``), its module does
            not import (``"module"``, chained to the ImportError) or lacks the name (``"name"``).
    """
    if not isinstance(path, str) or "." not in path:
        raise ClassPathError("format", f"expected 'package.Class', got {path!r}")
    mod_name, _, name = resolve_alias(path).rpartition(".")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ClassPathError("module", f"cannot import module {mod_name!r} ({exc})", mod_name, name) from exc
    obj = getattr(mod, name, None)
    if obj is None:
        raise ClassPathError("name", f"{mod_name!r} has no attribute {name!r}", mod_name, name)
    return obj
