"""lowmem: run Grok-1 on one GPU (or a CPU) by streaming only the routed experts.

``lowmem.load(model_dir, ...)`` returns a ``Runtime`` (``lowmem.api``) that
generates; importing this package does nothing else (no JAX initialization, no
compilation). The model configuration lives in ``quant.config`` (the packed
format needs it too) and is re-exported here.
"""
import os
import sys

from quant.config import PRESETS, GrokConfig, preset

__version__ = "0.1.0"
__all__ = ["GrokConfig", "PRESETS", "preset", "load", "__version__"]


def load(model_dir, **options):
    """Open a packed model directory; returns a ``lowmem.api.Runtime``.

    ``rt.generate(prompt, max_new_tokens=32, temperature=0.0, top_p=1.0, top_k=0,
    seed=0, stop=())`` yields token ids, ``rt.generate_text(...)`` (same
    arguments) text; ``rt.close()`` frees the device. ``options`` are
    ``lowmem.engine.EngineOptions`` fields, e.g. ``backend="host"``,
    ``expert_cache_gb=60`` (GiB), ``context=8192`` (tokens), ``cache_policy="layer"``.

    On a GPU, JAX's allocator may use only 75% of the device by default; if JAX
    has not been imported yet, this sets XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (as
    the CLIs do) so that the expert cache can use the whole device. Import
    lowmem before JAX, or set that variable yourself.
    """
    if "jax" not in sys.modules:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    from lowmem.api import load as _load
    return _load(model_dir, **options)
