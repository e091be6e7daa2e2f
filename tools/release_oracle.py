"""Every position's logits from the Grok-1 release's OWN model code: the external oracle.

Not part of the package and not run in CI: it needs a checkout of
xai-org/grok-1 (``--grok-src``: the directory holding its model.py) and the
release's stack in a separate environment (Python 3.11, jax/jaxlib 0.4.25,
dm-haiku 0.0.12, numpy < 2, ml_dtypes):

    python3.11 -m venv /tmp/oracle-venv
    /tmp/oracle-venv/bin/pip install jax==0.4.25 jaxlib==0.4.25 dm-haiku==0.0.12 "numpy<2" ml_dtypes
    /tmp/oracle-venv/bin/python tools/release_oracle.py --grok-src grok-1 \\
        --checkpoint /tmp/ckpt12 --preset tiny-12 --tokens 5,17,99 --mode fp32 --out oracle.npy
    python -m lowmem.eval --model MODEL --release-oracle oracle.npy --prompt-ids 5,17,99

The checkpoint (release format, e.g. from tools/make_checkpoint.py) is read
with this project's restricted reader (quant/, numpy only) and handed to the
release's haiku modules as its runner would (int8 ``QuantizedWeight8bit`` +
bf16 scales, fp32 norms, embeddings and router) on 8 forced host devices.

Modes:

- ``bf16``: the release's default run (``fprop_dtype=bfloat16``) under jit.
  XLA:CPU 0.4.25 cannot compile large bf16 x bf16 dots, so every dot or einsum
  of two bf16 operands runs as an fp32 dot (HIGHEST) rounded to bf16: what a
  GPU bf16 GEMM with fp32 accumulation returns.
- ``fp32``: the exact math. ``fprop_dtype=float32``, and the casts the release
  hard-codes in its MoE layer (bf16 expert output, bf16 gates) are lifted by
  mapping the name ``jnp.bfloat16`` to float32 inside its module; the scales
  are upcast to fp32 (exact), so ``int8 * scale`` is exact.

``--round-embedding`` rounds the fp32 embedding table to bf16 first: the packed
format stores it in bf16, so this is the model lowmem actually runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Jnp:
    """jax.numpy as the release's module sees it: bf16 dots via fp32; optional lifted casts."""

    def __init__(self, jnp, exact: bool):
        self._jnp, self._exact = jnp, exact

    def __getattr__(self, name):
        if name == "bfloat16" and self._exact:
            return self._jnp.float32
        return getattr(self._jnp, name)

    def _wrap(self, fn, *operands, **kw):
        import jax
        jnp = self._jnp
        if all(getattr(o, "dtype", None) == jnp.bfloat16 for o in operands):
            f32 = [o.astype(jnp.float32) for o in operands]
            return fn(*f32, precision=jax.lax.Precision.HIGHEST, **kw).astype(jnp.bfloat16)
        if self._exact:
            kw.setdefault("precision", jax.lax.Precision.HIGHEST)
        return fn(*operands, **kw)

    def dot(self, a, b, **kw):
        return self._wrap(self._jnp.dot, a, b, **kw)

    def einsum(self, spec, *operands, **kw):
        return self._wrap(lambda *o, **k: self._jnp.einsum(spec, *o, **k), *operands, **kw)


def load_release_module(grok_src: Path, exact: bool, ffn_size: int):
    """The release's model.py as a module, with our jnp proxy and the preset's FFN width."""
    import jax.numpy as jnp
    path = grok_src / "model.py"
    if not path.is_file():
        raise SystemExit(f"error: --grok-src {grok_src}: expected the release's model.py there")
    spec = importlib.util.spec_from_file_location("grok_release_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.jnp = _Jnp(jnp, exact)
    module.ffn_size = lambda emb_size, widening_factor: ffn_size
    return module


def release_params(G, ckpt: Path, cfg, exact: bool, round_embedding: bool) -> dict:
    """haiku params {module path: {name: value}} from a release-format checkpoint."""
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np
    from quant.checkpoint import iter_checkpoint
    params: dict = {}
    for spec, value in iter_checkpoint(ckpt, cfg):
        module, name = spec.name.rsplit("/", 1)
        if hasattr(value, "scales"):
            scales = np.asarray(value.scales)
            scales = scales.astype(np.float32) if exact else scales
            leaf = G.QuantizedWeight8bit(jnp.asarray(value.weight), jnp.asarray(scales))
        else:
            arr = np.asarray(value, np.float32)
            if spec.role == "embed" and round_embedding:
                arr = arr.astype(ml_dtypes.bfloat16).astype(np.float32)
            leaf = jnp.asarray(arr)
        params.setdefault(module, {})[name] = leaf
    return params


def release_logits(G, cfg, params, tokens, exact: bool, mesh_shape):
    """Logits (T, V) of the release's LanguageModel over tokens (one sequence)."""
    import haiku as hk
    import jax
    import jax.numpy as jnp
    import numpy as np
    dtype = jnp.float32 if exact else jnp.bfloat16
    tcfg = G.TransformerConfig(
        emb_size=cfg.emb_size, key_size=cfg.key_size, num_q_heads=cfg.num_q_heads,
        num_kv_heads=cfg.num_kv_heads, num_layers=cfg.num_layers, vocab_size=cfg.vocab_size,
        widening_factor=8, attn_output_multiplier=cfg.attn_output_multiplier,
        shard_activations=True, num_experts=cfg.num_experts,
        num_selected_experts=cfg.num_selected_experts, data_axis="data", model_axis="model")
    lm = G.LanguageModelConfig(
        model=tcfg, vocab_size=cfg.vocab_size, pad_token=cfg.pad_token_id,
        eos_token=cfg.eos_token_id, sequence_len=cfg.sequence_len,
        embedding_multiplier_scale=cfg.embedding_multiplier_scale,
        output_multiplier_scale=cfg.output_multiplier_scale, fprop_dtype=dtype).initialize()
    devices = np.array(jax.devices()[:mesh_shape[0] * mesh_shape[1]]).reshape(mesh_shape)
    mesh = jax.sharding.Mesh(devices, ("data", "model"))
    fwd = hk.without_apply_rng(hk.transform(lambda t: lm.make(mesh=mesh)(t).logits))
    with mesh:
        out = jax.jit(fwd.apply)(params, jnp.asarray(np.asarray(tokens, np.int32)[None]))
    return np.asarray(out.astype(jnp.float32))[0]                           # (T, V)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grok-src", required=True, help="checkout of xai-org/grok-1 (its model.py)")
    ap.add_argument("--checkpoint", required=True, help="release-format checkpoint directory")
    ap.add_argument("--preset", required=True, help="its lowmem preset (tiny-12, ...)")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--mode", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--round-embedding", action="store_true",
                    help="round the embedding table to bf16 (what a packed model stores)")
    ap.add_argument("--mesh", default="1,8", help="data,model mesh over the 8 host devices")
    ap.add_argument("--out", required=True, help="where to write the (T, V) float32 .npy")
    args = ap.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from quant.config import preset
    try:
        cfg = preset(args.preset)
        tokens = [int(t) for t in args.tokens.split(",")]
        mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    except ValueError as e:
        print(f"error: --preset/--tokens/--mesh: {e}", file=sys.stderr)
        return 2
    exact = args.mode == "fp32"
    G = load_release_module(Path(args.grok_src), exact, cfg.ffn_size)
    params = release_params(G, Path(args.checkpoint), cfg, exact, args.round_embedding)
    logits = release_logits(G, cfg, params, tokens, exact, mesh_shape)
    tmp = args.out + ".partial.npy"
    np.save(tmp, logits)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: logits {logits.shape} ({args.mode})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
