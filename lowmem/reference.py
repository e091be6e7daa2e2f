"""Dense reference forward pass of Grok-1: the oracle later code is tested against.

Plain numpy + ml_dtypes, no jax, no KV cache, no quantized kernels: every layer
runs every selected expert directly from fp32 weights, written to be obviously
right rather than fast (SPEC.md section 2, followed line by line).

Two modes:

``mode='bf16'`` is the release's default run (``fprop_dtype=bfloat16``) as it
actually executes under ``jax.jit`` with XLA:CPU (jax 0.4.25, 8 host devices),
not as its source reads: XLA's excess-precision simplification removes a
``convert`` to bf16 that is converted straight back, so most of the casts the
code asks for never happen (docs/FIDELITY.md: the optimized HLO and the
bit-level evidence). What stays, and what this mode rounds (ml_dtypes,
round-to-nearest-even):

- the q, k and v projection outputs (RoPE then runs in fp32 on them);
- the keys after RoPE and the values, as a bf16 KV cache holds them;
- the attention output (weights times values), before the output projection;
- the logits: fp32 product times the output multiplier rounded to bf16
  (0.578125 for Grok-1), the result rounded to bf16;
- ``bf16_activation * python_float`` constants are bf16 values (the embedding
  multiplier is 78.5 for Grok-1).

Everything else is fp32 as in the fp32 mode: the residual stream, the norm
outputs, the queries after RoPE, the attention logits and weights, the output
projection, the dequantized weights (``int8 * bf16 scale`` is exact), the
router, gates, the expert FFN and the MoE sum.

``mode='fp32'`` is the mathematical model in fp32: no bf16 rounding anywhere,
constants used at fp32 precision (78.38367..., 0.57735...), gates not rounded,
the MoE sum not cast. Decision: this is deliberately *not* a bit-level copy of
the release's ``fprop_dtype=float32`` run, which still rounds dequantized
weights, the gate probabilities and the MoE output to bf16 (hard-coded casts in
its MoE layer); a pure-fp32 oracle is what a float64 reimplementation can check
to ~1e-6, and what fast fp32 code should match.

``load_params`` dequantizes exactly to fp32; it holds the whole model in
memory, so it is for the small presets (tiny, tiny-12, demo), not for Grok-1.
"""
from __future__ import annotations

import logging
import os

import ml_dtypes
import numpy as np

from quant.config import GrokConfig
from quant.checkpoint import dequantize, iter_checkpoint

log = logging.getLogger(__name__)

MODES = ("fp32", "bf16")
MASK_VALUE = -1e30  # what the release writes into masked attention logits


# --- precision helpers --------------------------------------------------------

def bf16(x) -> np.ndarray:
    """Round to bf16 (nearest-even) and return as float32 holding bf16 values."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def act(x, mode: str) -> np.ndarray:
    """An activation: float32 in both modes (the release as executed keeps them in fp32)."""
    return np.asarray(x, np.float32)


def kv(x, mode: str) -> np.ndarray:
    """One of the release's kept roundings (q/k/v projections, keys after RoPE, values,
    attention output, logits): bf16 values in 'bf16' mode, float32 otherwise."""
    return bf16(x) if mode == "bf16" else np.asarray(x, np.float32)


def scalar(c: float, mode: str) -> np.float32:
    """A python-float constant multiplied into an activation (rounded to bf16 in bf16 mode)."""
    return np.float32(bf16(c)) if mode == "bf16" else np.float32(c)


def matmul(x: np.ndarray, w: np.ndarray, mode: str) -> np.ndarray:
    """``x @ w`` in fp32 with exact weights (both modes: see the module docstring)."""
    return np.asarray(x, np.float32) @ np.asarray(w, np.float32)


# --- components ---------------------------------------------------------------

def embed(tokens: np.ndarray, table: np.ndarray, multiplier: float, mode: str) -> np.ndarray:
    """Gather fp32 rows and scale (a bf16 constant in 'bf16'): (B, T) -> (B, T, D)."""
    rows = act(table[tokens], mode)                        # (B, T, D)
    return act(rows * scalar(multiplier, mode), mode)      # (B, T, D) fp32


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float, mode: str) -> np.ndarray:
    """fp32 ``scale * (x * rsqrt(mean(x^2) + eps))``, cast back; scale used as stored."""
    x32 = np.asarray(x, np.float32)                                        # (..., D)
    mean_sq = np.mean(np.square(x32), axis=-1, keepdims=True)              # (..., 1)
    normed = x32 * (np.float32(1.0) / np.sqrt(mean_sq + np.float32(eps)))  # (..., D)
    return act(np.asarray(scale, np.float32) * normed, mode)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """(x1, x2) -> (-x2, x1) over the last axis split in two halves (not interleaved)."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def rope(x: np.ndarray, positions: np.ndarray, base: float, mode: str) -> np.ndarray:
    """Rotate-half RoPE over all key_size dims, phase in fp32: x (B, T, H, K)."""
    k = x.shape[-1]
    exponents = np.arange(0, k, 2, dtype=np.float32)                          # (K/2,)
    inv_freq = (np.float32(1.0) / np.float32(base) ** (exponents / np.float32(k))
                ).astype(np.float32)                                          # (K/2,)
    phase = np.asarray(positions, np.float32)[:, None] * inv_freq[None, :]    # (T, K/2)
    phase = np.concatenate([phase, phase], axis=-1)[:, None, :]               # (T, 1, K)
    x32 = np.asarray(x, np.float32)
    return act(x32 * np.cos(phase) + rotate_half(x32) * np.sin(phase), mode)  # (B, T, H, K)


def attention_mask(tokens: np.ndarray, pad_token_id: int) -> np.ndarray:
    """(B, T, T) bool: key s visible from query t iff s <= t and token s is not padding."""
    t = tokens.shape[-1]
    causal = np.tril(np.ones((t, t), dtype=bool))          # (T, T)
    not_pad = tokens > pad_token_id                         # (B, T)
    return causal[None, :, :] & not_pad[:, None, :]         # (B, T, T)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """fp32 softmax (max-subtracted, as jax.nn.softmax)."""
    x = np.asarray(x, np.float32)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def attention(x: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, wo: np.ndarray,
              mask: np.ndarray, cfg: GrokConfig, mode: str) -> np.ndarray:
    """Grouped-query self-attention over positions 0..T-1: x (B, T, D) -> (B, T, D).

    Query head h uses KV head h // q_group (the release reshapes the query heads
    to (kv_heads, q_group)). Logits are soft-capped before masking.
    """
    b, t, _ = x.shape
    hkv, g, k = cfg.num_kv_heads, cfg.q_group, cfg.key_size
    positions = np.arange(t)
    q = rope(kv(matmul(x, wq, mode), mode).reshape(b, t, hkv * g, k), positions,
             cfg.rope_base, mode)                                       # (B, T, Hq, K) fp32
    kh = kv(rope(kv(matmul(x, wk, mode), mode).reshape(b, t, hkv, k), positions,
                 cfg.rope_base, mode), mode)                            # (B, S, Hkv, K)
    v = kv(matmul(x, wv, mode).reshape(b, t, hkv, k), mode)             # (B, S, Hkv, K)
    q = q.reshape(b, t, hkv, g, k)                                      # (B, T, Hkv, G, K)
    logits = act(np.einsum("bthgd,bshd->bhgts", q, kh), mode)           # (B, Hkv, G, T, S)
    logits = logits * np.float32(cfg.attn_output_multiplier)
    cap = np.float32(cfg.attn_logit_softcap)
    logits = cap * np.tanh(logits / cap)
    logits = np.where(mask[:, None, None, :, :], logits, np.float32(MASK_VALUE))
    weights = act(softmax(logits), mode)                                # (B, Hkv, G, T, S)
    out = kv(np.einsum("bhgts,bshd->bthgd", weights, v), mode)          # (B, T, Hkv, G, K)
    return matmul(out.reshape(b, t, hkv * g * k), wo, mode)             # (B, T, D)


def router_probs(x: np.ndarray, w_router: np.ndarray) -> np.ndarray:
    """fp32 softmax over experts of ``x @ w_router``: (..., D) -> (..., E). No soft-cap."""
    logits = np.asarray(x, np.float32) @ np.asarray(w_router, np.float32)  # (..., E)
    return softmax(logits)


def top2(probs: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The k largest probabilities (raw, not renormalized) and their expert ids.

    k = num_selected_experts (2 for Grok-1); ties go to the lower expert id, as
    in ``jax.lax.top_k``. Returns (gates (..., k) fp32, experts (..., k) int64).
    """
    experts = np.argsort(-probs, axis=-1, kind="stable")[..., :k]   # (..., k)
    gates = np.take_along_axis(probs, experts, axis=-1)              # (..., k)
    return gates.astype(np.float32), experts


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """jax.nn.gelu's default tanh approximation, in fp32 (not the exact-erf gelu)."""
    x = np.asarray(x, np.float32)
    inner = np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x ** 3)
    return x * (np.float32(0.5) * (np.float32(1.0) + np.tanh(inner)))


def expert_ffn(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray,
               mode: str) -> np.ndarray:
    """One expert's GeGLU ``down(gelu_tanh(x @ gate) * (x @ up))``: (N, D) -> (N, D) fp32.

    fp32 with exact weights in both modes (the release as executed rounds none of it).
    """
    gate = matmul(x, w_gate, mode)                          # (N, F)
    up = matmul(x, w_up, mode)                              # (N, F)
    hidden = gelu_tanh(gate) * up                           # (N, F) fp32
    return hidden @ np.asarray(w_down, np.float32)          # (N, D) fp32


def moe(x: np.ndarray, w_router: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray,
        w_down: np.ndarray, k: int, mode: str) -> np.ndarray:
    """Top-k mixture of experts: x (B, T, D) -> (B, T, D) in the activation dtype.

    Output = sum over the k selected experts of gate * expert(x), all fp32 (the
    release's bf16 casts of the gates and of the sum do not survive under jit).
    """
    probs = router_probs(x, w_router)                       # (B, T, E)
    gates, experts = top2(probs, k)                         # (B, T, k)
    flat_x = x.reshape(-1, x.shape[-1])                     # (N, D)
    flat_gates, flat_experts = gates.reshape(-1, k), experts.reshape(-1, k)
    out = np.zeros(flat_x.shape, np.float32)                # (N, D)
    for slot in range(k):
        for e in np.unique(flat_experts[:, slot]):
            rows = np.nonzero(flat_experts[:, slot] == e)[0]
            y = expert_ffn(flat_x[rows], w_gate[e], w_up[e], w_down[e], mode)
            out[rows] += flat_gates[rows, slot, None] * y
    return act(out.reshape(x.shape), mode)


def decoder_layer(h: np.ndarray, p: dict, mask: np.ndarray, cfg: GrokConfig,
                  mode: str) -> np.ndarray:
    """One layer with sandwich norms; the residual stream stays in the activation dtype."""
    eps = cfg.rms_norm_eps
    a = attention(rms_norm(h, p["attn_norm"], eps, mode), p["q"], p["k"], p["v"], p["o"],
                  mask, cfg, mode)
    h = act(h + rms_norm(a, p["attn_post_norm"], eps, mode), mode)
    m = moe(rms_norm(h, p["moe_norm"], eps, mode), p["router"], p["gate"], p["up"], p["down"],
            cfg.num_selected_experts, mode)
    return act(h + rms_norm(m, p["moe_post_norm"], eps, mode), mode)


def output_logits(h: np.ndarray, final_norm: np.ndarray, table: np.ndarray,
                  cfg: GrokConfig, mode: str) -> np.ndarray:
    """Final RMSNorm, tied-embedding logits, output multiplier: (B, T, D) -> (B, T, V).

    'bf16': fp32 product times the bf16 multiplier, rounded to bf16 (the release's
    one rounding outside attention)."""
    h = rms_norm(h, final_norm, cfg.rms_norm_eps, mode)
    logits = matmul(h, np.asarray(table).T, mode)           # (B, T, V)
    return kv(logits * scalar(cfg.output_multiplier_scale, mode), mode)


# --- whole model ----------------------------------------------------------------

def _check_tokens(tokens, cfg: GrokConfig) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens: expected an integer array, found dtype {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens[None, :]
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens: expected shape (T,) or (B, T) with T > 0, "
                         f"found {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"tokens: expected ids in [0, {cfg.vocab_size}), "
                         f"found range [{tokens.min()}, {tokens.max()}]")
    return tokens.astype(np.int64)


def expected_shapes(cfg: GrokConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each per-layer role in the dense params (as stored, (in, out))."""
    d, f, e = cfg.emb_size, cfg.ffn_size, cfg.num_experts
    norm = (d,)
    return {"gate": (e, d, f), "up": (e, d, f), "down": (e, f, d),
            "q": (d, cfg.q_width), "k": (d, cfg.kv_width), "v": (d, cfg.kv_width),
            "o": (cfg.q_width, d), "attn_norm": norm, "attn_post_norm": norm,
            "moe_norm": norm, "moe_post_norm": norm, "router": (d, e)}


def check_params(cfg: GrokConfig, params: dict) -> None:
    """Raise ValueError naming the first parameter whose shape does not fit ``cfg``."""
    want = {"embed": (cfg.vocab_size, cfg.emb_size), "final_norm": (cfg.emb_size,)}
    for name, shape in want.items():
        found = np.shape(params.get(name))
        if found != shape:
            raise ValueError(f"params[{name!r}]: expected shape {shape}, found {found}")
    layers = params.get("layers", [])
    if len(layers) != cfg.num_layers:
        raise ValueError(f"params['layers']: expected {cfg.num_layers} layers, "
                         f"found {len(layers)}")
    for i, layer in enumerate(layers):
        for role, shape in expected_shapes(cfg).items():
            found = np.shape(layer.get(role))
            if found != shape:
                raise ValueError(f"params['layers'][{i}][{role!r}]: expected shape {shape}, "
                                 f"found {found}")


def forward(cfg: GrokConfig, params: dict, tokens, mode: str = "fp32") -> np.ndarray:
    """Logits (B, T, V) float32 for tokens (B, T) or (T,) at positions 0..T-1.

    Full causal attention over the given tokens (no cache); keys holding the
    pad token (id <= pad_token_id) are masked out.
    """
    _check_mode(mode)
    tokens = _check_tokens(tokens, cfg)                     # (B, T)
    check_params(cfg, params)
    mask = attention_mask(tokens, cfg.pad_token_id)         # (B, T, T)
    h = embed(tokens, params["embed"], cfg.embedding_multiplier_scale, mode)  # (B, T, D)
    for layer in params["layers"]:
        h = decoder_layer(h, layer, mask, cfg, mode)
    return output_logits(h, params["final_norm"], params["embed"], cfg, mode)  # (B, T, V)


def load_params(ckpt_dir: str | os.PathLike, cfg: GrokConfig) -> dict:
    """Read a release-format checkpoint and dequantize every tensor to fp32.

    Files come in lexicographic layer order (0, 1, 10, ...); the returned
    ``layers`` list is indexed by the true layer number from each file's spec.
    """
    params: dict = {"layers": [dict() for _ in range(cfg.num_layers)]}
    for spec, value in iter_checkpoint(ckpt_dir, cfg):
        weights = dequantize(value)
        if spec.layer is None:
            params[spec.role] = weights
        else:
            params["layers"][spec.layer][spec.role] = weights
    log.info("loaded %d layers from %s", cfg.num_layers, ckpt_dir)
    check_params(cfg, params)
    return params


def build_parser(prog: str = "python -m lowmem.reference"):
    from lowmem import cli
    p = cli.Parser(prog=prog, description="Dense reference forward pass (SPEC.md section 2) "
                                          "over a release-format checkpoint; small presets only.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT_DIR",
                   help="ckpt-0-style directory (required)")
    cli.add_config_arguments(p)
    p.add_argument("--prompt-ids", "--tokens", default="5,17,99,3", metavar="IDS",
                   help="comma-separated token ids (default 5,17,99,3)")
    p.add_argument("--mode", default="bf16", choices=MODES,
                   help="activation precision (default bf16)")
    cli.add_verbosity(p)
    return p


def main(argv=None, prog: str = "python -m lowmem.reference") -> int:
    """lowmem reference: the oracle on a small release-format checkpoint."""
    from lowmem import cli
    args = build_parser(prog).parse_args(argv)
    cli.setup_cli(args)
    args.prompt = args.prompt_file = None

    def run(args) -> int:
        cfg = cli.load_config(args.preset, args.config)
        tokens = np.array(cli.read_prompt(args))
        bad = tokens[(tokens < 0) | (tokens >= cfg.vocab_size)]
        if bad.size:
            raise cli.CLIError(f"--prompt-ids: expected ids in [0, {cfg.vocab_size}), found "
                               f"{bad[:5].tolist()}")
        logits = forward(cfg, load_params(args.checkpoint, cfg), tokens, args.mode)[0]  # (T, V)
        for pos, row in enumerate(logits):
            top = np.argsort(-row)[:5]
            values = ", ".join(f"{v:.3f}" for v in row[top])
            print(f"position {pos} (token {tokens[pos]}): top-5 next tokens {top.tolist()}, "
                  f"logits [{values}]")
        return 0

    return cli.run_main(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
