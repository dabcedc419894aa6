"""Makes lm-eval's own ``lm_eval --model neox_jax`` command find our model.

lm-eval 0.4 knows a model only once its class is in ``lm_eval.api.registry.model_registry``,
and it has no plugin discovery: its console script never imports neox_jax. So setup.py
installs ``neox_jax-lm_eval.pth`` into site-packages; Python runs that file's import line
at start-up, which calls ``install()`` here. ``install()`` puts a finder at the front of
``sys.meta_path`` that does nothing until ``lm_eval.api.registry`` is imported; then it
lets the module load and registers ``neox_jax`` as a lazy ``"module:Class"`` placeholder.
Nothing of neox_jax, jax or lm-eval is imported at start-up, and the adapter module is
imported only when lm-eval looks the model up. Everything here is stdlib and never raises
into the importing program: a failure becomes a warning.
"""

import sys
import warnings

REGISTRY_MODULE = "lm_eval.api.registry"
MODEL_NAME = "neox_jax"
# lm-eval upgrades this placeholder to the class when the adapter's @register_model runs,
# because the string is exactly f"{cls.__module__}:{cls.__name__}".
MODEL_TARGET = "neox_jax.evaluation.lm_eval_adapter:NeoxLM"

# What setup.py writes to site-packages. A .pth line that starts with "import" runs at
# interpreter start-up; the try keeps a half-removed install from printing an error in
# every Python process.
PTH_NAME = "neox_jax-lm_eval.pth"
PTH_LINE = (
    'import sys; exec("try:\\n import neox_jax._lm_eval_hook as h\\n h.install()\\n'
    'except ImportError:\\n pass")\n'
)


def register(registry_module) -> None:
    """Register the lazy ``neox_jax`` model in an imported ``lm_eval.api.registry``."""
    try:
        registry = registry_module.model_registry
        if MODEL_NAME not in registry:
            registry.register(MODEL_NAME, target=MODEL_TARGET)
    except Exception as e:  # an lm-eval whose registry changed must still import
        warnings.warn(
            f"neox_jax could not register its lm-eval model ({type(e).__name__}: {e}); use "
            "`python -m neox_jax.evaluation.lm_eval_cli` instead of `lm_eval`.",
            stacklevel=2,
        )


class RegistryWatcher:
    """A ``sys.meta_path`` finder that registers ``neox_jax`` once lm-eval's registry loads."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        load = loader.exec_module  # the loader is this spec's own; wrap only its method

        def exec_module(module):
            load(module)
            register(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Put the watcher first on ``sys.meta_path`` (once); register now if lm-eval is loaded."""
    if any(isinstance(f, RegistryWatcher) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, RegistryWatcher())
    if REGISTRY_MODULE in sys.modules:
        register(sys.modules[REGISTRY_MODULE])
