"""Model configuration: one frozen dataclass with named presets.

Every number in SPEC.md section 1 lives here, so nothing else hard-codes a
Grok-1 size. Variants are made with ``dataclasses.replace``; the config is
passed explicitly and serialized into every model directory as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass


def ffn_size(emb_size: int, factor: float = 8) -> int:
    """Grok-1's ``ffn(D, 8)``: int(8 * D) * 2 // 3 rounded up to a multiple of 8."""
    size = int(factor * emb_size) * 2 // 3
    return size + (-size) % 8


@dataclass(frozen=True)
class GrokConfig:
    vocab_size: int = 131072
    emb_size: int = 6144
    num_layers: int = 64
    num_q_heads: int = 48
    num_kv_heads: int = 8
    key_size: int = 128
    ffn_size: int = 32768
    num_experts: int = 8
    num_selected_experts: int = 2
    sequence_len: int = 8192
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    unk_token_id: int = 3
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    attn_output_multiplier: float = 0.08838834764831845
    rms_norm_eps: float = 1e-5
    rope_base: float = 10000.0
    attn_logit_softcap: float = 30.0
    # The release quantizes the attention output and expert down projections
    # with this many contiguous row blocks of scales (SPEC.md section 5).
    scale_row_blocks: int = 8

    def __post_init__(self):
        self._check_types()
        problems = []
        if self.num_q_heads % self.num_kv_heads:
            problems.append("num_q_heads must be a multiple of num_kv_heads")
        if self.ffn_size % self.scale_row_blocks:
            problems.append("ffn_size must be a multiple of scale_row_blocks")
        if (self.num_q_heads * self.key_size) % self.scale_row_blocks:
            problems.append("num_q_heads * key_size must be a multiple of scale_row_blocks")
        if self.key_size % 2:
            problems.append("key_size must be even (rotate-half RoPE)")
        if not 0 < self.num_selected_experts <= self.num_experts:
            problems.append("need 0 < num_selected_experts <= num_experts")
        if problems:
            raise ValueError("invalid GrokConfig: " + "; ".join(problems))

    def _check_types(self) -> None:
        """Every field has its annotated type (JSON configs come from users): ints are
        ints (not bools) and positive except token ids (>= 0); floats are finite."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                ok = isinstance(v, int) and not isinstance(v, bool)
                ok = ok and (v >= 0 if f.name.endswith("_token_id") else v > 0)
                want = "a non-negative integer" if f.name.endswith("_token_id") else \
                    "a positive integer"
            else:
                ok = (isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v))
                want = "a finite number"
            if not ok:
                raise ValueError(f"invalid GrokConfig: {f.name} must be {want}, found {v!r}")

    @property
    def q_group(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def q_width(self) -> int:
        return self.num_q_heads * self.key_size

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.key_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "GrokConfig":
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object of GrokConfig fields, found "
                             f"{type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GrokConfig fields: {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "GrokConfig":
        return cls.from_dict(json.loads(text))


def _small(emb_size: int, vocab_size: int, num_layers: int, q_heads: int, kv_heads: int,
           key_size: int, sequence_len: int, ffn: int) -> GrokConfig:
    """A scaled-down Grok-1 that keeps every structural feature.

    ``ffn`` is a multiple of 128 (as Grok-1's 32768 is) so that every int4
    group size divides both projection input widths.
    """
    return GrokConfig(
        vocab_size=vocab_size, emb_size=emb_size, num_layers=num_layers,
        num_q_heads=q_heads, num_kv_heads=kv_heads, key_size=key_size,
        ffn_size=ffn, sequence_len=sequence_len,
        embedding_multiplier_scale=math.sqrt(emb_size),
        attn_output_multiplier=1.0 / math.sqrt(key_size),
    )


PRESETS: dict[str, GrokConfig] = {
    # The released model.
    "grok-1": GrokConfig(),
    # Unit tests: milliseconds per forward on CPU; 8 experts, top-2, GQA group
    # of 2, 8-row-block scales. Tiny vocabulary, so feed token ids directly.
    "tiny": _small(emb_size=64, vocab_size=512, num_layers=2, q_heads=4, kv_heads=2,
                   key_size=16, sequence_len=128, ffn=256),
    # Like tiny with more layers (layer-order and streaming tests).
    "tiny-12": _small(emb_size=64, vocab_size=512, num_layers=12, q_heads=4, kv_heads=2,
                      key_size=16, sequence_len=128, ffn=256),
    # The embedded default: the real 131072-piece vocabulary, so the release's
    # tokenizer works end to end, at a size that generates quickly on CPU.
    "demo": _small(emb_size=256, vocab_size=131072, num_layers=4, q_heads=8, kv_heads=2,
                   key_size=32, sequence_len=1024, ffn=1024),
}


def preset(name: str, **overrides) -> GrokConfig:
    """A named preset, optionally with fields replaced (e.g. ``num_layers=2``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
