"""Makes ``lm_eval --model medfoundry`` work: registers medfoundry's model in lm-evaluation-harness's model registry
as soon as lm-eval loads its own models, without importing lm-eval (or torch) before then.

lm-eval 0.4.13 finds models only in its registry, filled by ``lm_eval.models`` (no entry points), so an installed
plugin has no other way in. ``medfoundry-lm-eval.pth``, installed into site-packages beside medfoundry, imports this
module at every interpreter start; all it does then is put a finder in front of ``sys.meta_path`` (no import, a
few microseconds). When ``lm_eval.models`` is imported, the finder wraps its loader so that, right after the module
has run, ``medfoundry`` is registered as a lazy placeholder: ``medfoundry.eval.lm_eval_backend`` (and torch) are
imported only when a run asks lm-eval for that model.
"""

import sys

MODULE = "lm_eval.models"  # fills lm-eval's model registry, imported by get_model on first use
NAME = "medfoundry"
TARGET = "medfoundry.eval.lm_eval_backend:MedfoundryLM"


class _Finder:
    """Finds ``lm_eval.models`` through the other finders, and hands out its spec with a registering loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != MODULE:
            return None
        sys.meta_path.remove(self)  # once is enough, and the other finders run without this one
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader:
    """The original loader, registering medfoundry's model after the module has run."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        register()


def register() -> None:
    """The lazy placeholder; an import of the backend itself replaces it with the class (lm-eval allows that)."""
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


def install() -> None:
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
