"""lowmem: run Grok-1 on one GPU (or a CPU) by streaming only the routed experts.

``lowmem.load(model_dir, ...)`` returns a runtime; importing this package does
nothing else (no JAX initialization, no compilation). The model configuration
lives in ``quant.config`` (the packed format needs it too) and is re-exported
here.
"""
from quant.config import PRESETS, GrokConfig, preset

__all__ = ["GrokConfig", "PRESETS", "preset", "load"]


def load(model_dir, **options):
    """Open a packed model directory; see ``lowmem.engine.EngineOptions`` for options."""
    from lowmem.api import load as _load
    return _load(model_dir, **options)
