"""Merge methods: importing this package registers every module in it (one file per method)."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("registry",) and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

from jmerge.merge.registry import METHODS, Method, get, register  # noqa: E402,F401  (the public API)
