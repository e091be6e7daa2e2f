"""Every Grok-1 weight, described once.

The release checkpoint order, the quantizer's output layout and the runtime's
memory-mapped views are all derived from ``checkpoint_specs(cfg)``; nothing
else spells out a weight's name, shape or storage.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from quant.config import GrokConfig

# Per-layer leaves in sorted-key order (SPEC.md section 5): (path, role).
LAYER_LEAVES = (
    ("moe/linear/w", "gate"),
    ("moe/linear_1/w", "down"),
    ("moe/linear_v/w", "up"),
    ("multi_head_attention/key/w", "k"),
    ("multi_head_attention/linear/w", "o"),
    ("multi_head_attention/query/w", "q"),
    ("multi_head_attention/value/w", "v"),
    ("rms_norm/scale", "attn_norm"),        # before attention
    ("rms_norm_1/scale", "attn_post_norm"),  # after attention
    ("rms_norm_2/scale", "moe_norm"),        # before the MoE
    ("rms_norm_3/scale", "moe_post_norm"),   # after the MoE
    ("router/w", "router"),
)
EXPERT_ROLES = ("gate", "up", "down")
ATTENTION_ROLES = ("q", "k", "v", "o")


@dataclass(frozen=True)
class WeightSpec:
    """One leaf of the release checkpoint.

    ``shape`` is the stored weight shape, (in_features, out_features) for
    matrices, with a leading expert axis when ``per_expert``. ``scale_shape`` is
    set for int8 leaves (bf16 scales); None means an fp32 array.
    """
    index: int               # file number in ckpt-0/
    name: str                # release path
    role: str
    layer: int | None
    shape: tuple[int, ...]
    scale_shape: tuple[int, ...] | None

    @property
    def quantized(self) -> bool:
        return self.scale_shape is not None

    @property
    def per_expert(self) -> bool:
        return self.role in EXPERT_ROLES

    @property
    def dtype(self) -> str:
        return "int8" if self.quantized else "float32"

    @property
    def filename(self) -> str:
        return f"tensor{self.index:05d}_000"

    @property
    def row_blocks(self) -> int:
        """Scale groups along the input dimension (1 = per output column)."""
        return self.scale_shape[-2] if self.quantized else 0


def layer_file_order(num_layers: int) -> list[int]:
    """Layers in the order their files appear: lexicographic, 0, 1, 10, 11, ..."""
    return sorted(range(num_layers), key=str)


def _layer_shapes(cfg: GrokConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]]:
    d, f, e, b = cfg.emb_size, cfg.ffn_size, cfg.num_experts, cfg.scale_row_blocks
    return {
        "gate": ((e, d, f), (e, 1, f)),
        "down": ((e, f, d), (e, b, d)),
        "up": ((e, d, f), (e, 1, f)),
        "k": ((d, cfg.kv_width), (1, cfg.kv_width)),
        "o": ((cfg.q_width, d), (b, d)),
        "q": ((d, cfg.q_width), (1, cfg.q_width)),
        "v": ((d, cfg.kv_width), (1, cfg.kv_width)),
        "attn_norm": ((d,), None),
        "attn_post_norm": ((d,), None),
        "moe_norm": ((d,), None),
        "moe_post_norm": ((d,), None),
        "router": ((d, e), None),
    }


@lru_cache(maxsize=16)
def checkpoint_specs(cfg: GrokConfig) -> tuple[WeightSpec, ...]:
    """All leaves in file order; ``specs[i]`` is stored in ``tensor{i:05d}_000``.

    Computed once per config (the config is frozen, so it is a cache key).
    """
    specs = [
        WeightSpec(0, "language_model/in_out_embed/embeddings", "embed", None,
                   (cfg.vocab_size, cfg.emb_size), None),
        WeightSpec(1, "language_model/rms_norm/scale", "final_norm", None, (cfg.emb_size,), None),
    ]
    shapes = _layer_shapes(cfg)
    for layer in layer_file_order(cfg.num_layers):
        for path, role in LAYER_LEAVES:
            shape, scale_shape = shapes[role]
            specs.append(WeightSpec(len(specs), f"transformer/decoder_layer_{layer}/{path}",
                                    role, layer, shape, scale_shape))
    return tuple(specs)


def global_specs(cfg: GrokConfig) -> dict[str, WeightSpec]:
    """The two leaves outside the layers, by role: 'embed' and 'final_norm'."""
    return {s.role: s for s in checkpoint_specs(cfg)[:2]}


@lru_cache(maxsize=16)
def _specs_by_layer(cfg: GrokConfig) -> dict[int, dict[str, WeightSpec]]:
    out: dict[int, dict[str, WeightSpec]] = {}
    for s in checkpoint_specs(cfg)[2:]:
        out.setdefault(s.layer, {})[s.role] = s
    return out


def layer_specs(cfg: GrokConfig, layer: int) -> dict[str, WeightSpec]:
    """The 12 leaves of one layer, by role (in the release's sorted-key order)."""
    return dict(_specs_by_layer(cfg)[layer])


def layers_in_file_order(cfg: GrokConfig) -> list[tuple[int, list[WeightSpec]]]:
    """(layer, its 12 specs) in the order their files appear: 0, 1, 10, 11, ..."""
    by_layer = _specs_by_layer(cfg)
    return [(layer, list(by_layer[layer].values())) for layer in layer_file_order(cfg.num_layers)]


def expert_tensor_name(layer: int, role: str, expert: int, part: str | None = None) -> str:
    """The name of one expert's matrix (or of its ``part``: 'values' or 'scales').

    The release stores all experts of a role in one leaf; the packed format
    and the quantizer name each expert's slice ``<layer path>/<role>[e]``.
    """
    name = f"transformer/decoder_layer_{layer}/{role}[{expert}]"
    return name if part is None else f"{name}.{part}"


def num_checkpoint_files(cfg: GrokConfig) -> int:
    return 2 + len(LAYER_LEAVES) * cfg.num_layers
