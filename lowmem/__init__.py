"""lowmem: run Grok-1 on one GPU (or a CPU) by streaming only the routed experts.

``lowmem.load(model_dir, ...)`` returns an engine; importing this package does
nothing else (no JAX initialization, no compilation).
"""


def load(model_dir, **options):
    """Open a packed model directory; see ``lowmem.engine.EngineOptions`` for options."""
    from lowmem.api import load as _load
    return _load(model_dir, **options)
