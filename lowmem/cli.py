"""What every command-line tool shares: logging set-up and the engine options.

The CLIs (generate, profile, ...) define their options here once, so that a
flag means the same in each.
"""
from __future__ import annotations

import logging
import os

from lowmem.engine import DEFAULT_PRECISION
from lowmem.model import PRECISIONS


def setup_cli(verbose: bool) -> None:
    """Logging for a CLI, and JAX's GPU allocator at 95% of the device, not 75%.

    The expert cache is sized from the allocator's limit, so JAX's default
    would leave a fifth of an H100 unused. Environment variables are read when
    JAX starts its backend, so CLI mains call this first; library users set
    XLA_PYTHON_CLIENT_MEM_FRACTION themselves.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def add_engine_arguments(p) -> None:
    """The engine options every CLI shares (generate, profile)."""
    p.add_argument("--expert-cache-gb", type=float, default=None,
                   help="device expert cache budget in GiB (default: what fits after resident "
                        "weights, KV cache and headroom)")
    p.add_argument("--cache-policy", choices=("lru", "layer"), default="lru",
                   help="expert eviction: lru, or layer (evict the layer whose turn comes last; "
                        "far better when the cache holds less than one token's experts)")
    p.add_argument("--context", type=int, default=None,
                   help="KV cache length in tokens (default: the model's sequence length)")
    p.add_argument("--backend", choices=("auto", "host", "device"), default="auto",
                   help="host = numba kernels on the mapped files (CPU default); "
                        "device = experts streamed into an accelerator cache (GPU default)")
    p.add_argument("--no-prefetch", action="store_true", help="disable speculative expert prefetch")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="activations: fp32 = the exact math of the weights; bf16 = as the "
                        f"release runs (default {DEFAULT_PRECISION}; docs/FIDELITY.md)")


def engine_kwargs(args) -> dict:
    """EngineOptions fields from arguments added by add_engine_arguments."""
    return dict(backend=args.backend, expert_cache_gb=args.expert_cache_gb, context=args.context,
                prefetch=not args.no_prefetch, cache_policy=args.cache_policy,
                precision=args.precision)
