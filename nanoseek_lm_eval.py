"""Makes `lm_eval --model nanoseek` work once nanoseek is installed.

lm-eval (0.4.x) finds models only in its own registry and has no plugin discovery, so `nanoseek_lm_eval.pth`
(installed next to this module) imports this module at interpreter start. It loads nothing: it only watches for
`lm_eval.models`, lm-eval's table of built-in models, and when that is imported adds a lazy entry
`nanoseek -> nanoseek.eval.harness:NanoseekLM`, so the adapter (and torch) load only when `--model nanoseek` is used.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

MODEL_NAME = "nanoseek"
TARGET = "nanoseek.eval.harness:NanoseekLM"


def register() -> None:
    """Add the lazy registry entry (idempotent; a no-op if the registry already has the name)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "lm_eval.models":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                register()
            except Exception as e:  # never break lm-eval itself
                print(f"nanoseek: could not register the lm-eval model ({e})", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Called from the .pth file: register now if lm-eval's table is loaded, else when it is."""
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
