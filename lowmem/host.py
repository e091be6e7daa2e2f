"""Host matmuls inside jitted code: numba kernels reached through pure_callback.

On a CPU, XLA with the dequantization inside ``jax.jit`` is tens of times
slower than a numba kernel reading the int8 (or packed int4) weights directly
from the memory-mapped files. The attention code calls ``linear(x, w)``; on the
host path ``w`` is a ``HostWeight`` handle (which tensor, and its output
width), and the product runs in ``lowmem.kernels.matmul`` on the mapped view.
Handles of the same role and shape in different layers share one compiled
executable: only the layer number (a traced int) differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


@dataclass(frozen=True)
class HostWeight:
    """Stand-in for a weight inside jit: a traced layer number plus static shape."""
    layer: jax.Array | int
    role: str
    out_features: int


def _hw_flatten(w: HostWeight):
    return (w.layer,), (w.role, w.out_features)


def _hw_unflatten(aux, children):
    return HostWeight(children[0], *aux)


def register_host_weight_pytree() -> None:
    try:
        jax.tree_util.register_pytree_node(HostWeight, _hw_flatten, _hw_unflatten)
    except ValueError:  # already registered
        pass


def make_host_linear(lookup: Callable[[int, str], object]) -> Callable:
    """A ``linear(x, w)`` for HostWeight handles; ``lookup(layer, role)`` gives the weight."""
    from lowmem.kernels import matmul

    def run(role: str, x: np.ndarray, layer: np.ndarray) -> np.ndarray:
        return matmul(np.asarray(x, np.float32), lookup(int(layer), role))

    def linear(x: jax.Array, w: HostWeight) -> jax.Array:
        shape = jax.ShapeDtypeStruct((x.shape[0], w.out_features), F32)
        fn = _RoleCall(run, w.role)
        out = jax.pure_callback(fn, shape, x.astype(F32), w.layer)
        return out.astype(jnp.bfloat16)   # a bf16 matmul's output
    return linear


@dataclass(frozen=True)
class _RoleCall:
    """Hashable callback (role fixed) so that traces of the same role are reused."""
    run: Callable
    role: str

    def __call__(self, x, layer):
        return self.run(self.role, x, layer)


def make_host_logits(embed: np.ndarray) -> Callable:
    """``logits(hn)``: hn (T, D) bf16 @ embed^T with the numba kernel -> bf16 (T, V)."""
    from lowmem.kernels import matmul_nt

    def run(x: np.ndarray) -> np.ndarray:
        return matmul_nt(np.asarray(x, np.float32), embed)

    def logits(hn: jax.Array) -> jax.Array:
        shape = jax.ShapeDtypeStruct((hn.shape[0], embed.shape[0]), F32)
        return jax.pure_callback(run, shape, hn.astype(F32)).astype(jnp.bfloat16)
    return logits
