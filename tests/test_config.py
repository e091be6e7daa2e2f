"""Config presets and checkpoint file layout against SPEC.md sections 1 and 5."""
import dataclasses
import math

import pytest

from quant.config import PRESETS, GrokConfig, ffn_size, preset
from quant.spec import checkpoint_specs, layer_specs, num_checkpoint_files


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_keep_grok_structure(name):
    cfg = preset(name)
    assert cfg.num_experts == 8 and cfg.num_selected_experts == 2
    assert cfg.q_group > 1 and cfg.num_q_heads == cfg.q_group * cfg.num_kv_heads
    assert cfg.scale_row_blocks == 8
    specs = layer_specs(cfg, 0)
    assert specs["down"].scale_shape == (8, 8, cfg.emb_size)
    assert specs["o"].scale_shape == (8, cfg.emb_size)
    assert specs["gate"].scale_shape == (8, 1, cfg.ffn_size)
    assert cfg.embedding_multiplier_scale == pytest.approx(math.sqrt(cfg.emb_size))
    assert cfg.attn_output_multiplier == pytest.approx(1 / math.sqrt(cfg.key_size))


def test_grok1_numbers_match_spec():
    cfg = preset("grok-1")
    expected = dict(vocab_size=131072, emb_size=6144, num_layers=64, num_q_heads=48,
                    num_kv_heads=8, key_size=128, ffn_size=32768, num_experts=8,
                    num_selected_experts=2, sequence_len=8192, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, unk_token_id=3,
                    embedding_multiplier_scale=78.38367176906169,
                    output_multiplier_scale=0.5773502691896257,
                    attn_output_multiplier=0.08838834764831845, rms_norm_eps=1e-5,
                    rope_base=10000.0)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.q_group == 6
    assert ffn_size(6144) == 32768
    assert ffn_size(6144) == cfg.ffn_size


def test_grok1_parameter_count():
    specs = checkpoint_specs(preset("grok-1"))
    assert sum(math.prod(s.shape) for s in specs) == 315_684_820_992
    expert = [s for s in specs if s.layer == 0 and s.per_expert]
    assert sum(math.prod(s.shape) for s in expert) == 8 * 603_979_776  # 3 matrices per expert


def test_json_round_trip():
    for name in PRESETS:
        cfg = preset(name)
        assert GrokConfig.from_json(cfg.to_json()) == cfg
    cfg = preset("tiny", num_layers=5, rope_base=500.0)
    assert GrokConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("bad", [
    dict(num_q_heads=5, num_kv_heads=2),
    dict(key_size=15),
    dict(num_selected_experts=9),
    dict(num_selected_experts=0),
    dict(ffn_size=260),
])
def test_invalid_config_raises(bad):
    with pytest.raises(ValueError, match="invalid GrokConfig"):
        preset("tiny", **bad)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown GrokConfig fields"):
        GrokConfig.from_dict({**dataclasses.asdict(preset("tiny")), "emb_dim": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("grok-2")


def test_grok1_file_order():
    cfg = preset("grok-1")
    specs = checkpoint_specs(cfg)
    assert len(specs) == num_checkpoint_files(cfg) == 770
    assert [s.index for s in specs] == list(range(770))
    assert (specs[0].name, specs[0].shape) == ("language_model/in_out_embed/embeddings",
                                               (131072, 6144))
    assert (specs[1].name, specs[1].shape) == ("language_model/rms_norm/scale", (6144,))
    first = {}
    for s in specs[2:]:
        first.setdefault(s.layer, s.index)
    assert first[0] == 2 and first[1] == 14
    assert first[10] == 26 and first[2] == 146 and first[9] == 758
    assert specs[-1].index == 769 and specs[-1].name == "transformer/decoder_layer_9/router/w"
    assert [s.layer for s in specs[2::12]][:4] == [0, 1, 10, 11]


def test_layer_leaves_match_spec_table():
    layer = checkpoint_specs(preset("grok-1"))[146:158]
    rows = [(s.name.split("decoder_layer_2/")[1], s.shape, s.scale_shape) for s in layer]
    assert rows == [
        ("moe/linear/w", (8, 6144, 32768), (8, 1, 32768)),
        ("moe/linear_1/w", (8, 32768, 6144), (8, 8, 6144)),
        ("moe/linear_v/w", (8, 6144, 32768), (8, 1, 32768)),
        ("multi_head_attention/key/w", (6144, 1024), (1, 1024)),
        ("multi_head_attention/linear/w", (6144, 6144), (8, 6144)),
        ("multi_head_attention/query/w", (6144, 6144), (1, 6144)),
        ("multi_head_attention/value/w", (6144, 1024), (1, 1024)),
        ("rms_norm/scale", (6144,), None),
        ("rms_norm_1/scale", (6144,), None),
        ("rms_norm_2/scale", (6144,), None),
        ("rms_norm_3/scale", (6144,), None),
        ("router/w", (6144, 8), None),
    ]
    assert [s.role for s in layer][:3] == ["gate", "down", "up"]
