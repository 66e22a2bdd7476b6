"""Third-party additions: installed packages register training methods, verifiers, models or datasets.

A package declares an entry point in the group `abscert_bench.plugins`; its value is a module (imported) or a
callable (imported, then called with no arguments) that registers its additions with the registries' decorators::

    # the plugin's pyproject.toml
    [project.entry-points."abscert_bench.plugins"]
    my-verifier = "my_package.abscert_plugin"

    # my_package/abscert_plugin.py
    from abscert_bench.verification import VERIFIERS, Verifier

    @VERIFIERS.register("my-verifier")
    def my_verifier(**options): ...

Plugins are loaded once per process, when `abscert_bench.verification` or `abscert_bench.training` is first imported
(right after the built-ins), so the CLI, the harness and its worker processes all see them. A plugin that fails
to import is reported with a warning and skipped; the rest of the tool keeps working.
"""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "abscert_bench.plugins"

_loaded: list[str] | None = None


def load_plugins() -> list[str]:
    """Import every installed plugin once; returns the names of those that loaded."""
    global _loaded
    if _loaded is not None:
        return list(_loaded)
    _loaded = []
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        try:
            target = point.load()
            if callable(target):
                target()
        except Exception as exc:  # a broken plugin must not take the tool down
            warnings.warn(f"abscert-bench plugin {point.name!r} ({point.value}) failed to load: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
            continue
        _loaded.append(point.name)
    return list(_loaded)


def loaded_plugins() -> list[str]:
    """Names of the plugins this process loaded (empty before the registries were imported)."""
    return list(_loaded or [])
