"""The checkpoint directory as a whole: its exact file set, and the config its shapes imply.

A config given by the user (``--preset``/``--config``) is a claim about the
checkpoint; the files decide. ``infer_config`` reads only pickle headers
(large payloads are mapped, not read: quant.checkpoint's mmap mode) of the
embeddings and the first layer's 12 files, and counts the tensor files;
``check_checkpoint`` requires exactly the files a config expects, each with
its kind, dtype and shape, so a 12-layer checkpoint can never be quantized
as a 2-layer model.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from quant.checkpoint import (CheckpointError, QuantizedWeight8bit, check_checkpoint_dir,
                              load_tensor_file, read_tensor)
from quant.config import PRESETS, GrokConfig
from quant.spec import LAYER_LEAVES, WeightSpec, checkpoint_specs, num_checkpoint_files

_TENSOR_FILE = re.compile(r"tensor(\d{5})_000")
# The GrokConfig numbers that shapes determine (q/kv widths: heads x key_size).
SHAPE_FIELDS = ("vocab_size", "emb_size", "num_layers", "ffn_size", "num_experts",
                "scale_row_blocks", "q_width", "kv_width")


def shape_signature(cfg: GrokConfig) -> dict[str, int]:
    return {f: getattr(cfg, f) for f in SHAPE_FIELDS}


def tensor_files(ckpt_dir: Path) -> list[str]:
    """Names of the files that look like checkpoint tensors (``tensor*``), sorted."""
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("tensor"))


def _num_layers(ckpt_dir: Path) -> int:
    names = tensor_files(ckpt_dir)
    bad = [n for n in names if not _TENSOR_FILE.fullmatch(n)]
    numbers = sorted(int(_TENSOR_FILE.fullmatch(n).group(1)) for n in names if n not in bad)
    leaves = len(LAYER_LEAVES)
    if bad or numbers != list(range(len(numbers))) or len(numbers) < 2 + leaves \
            or (len(numbers) - 2) % leaves:
        gaps = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
        raise CheckpointError(
            f"{ckpt_dir}: expected tensor files tensor00000_000 .. numbered without gaps, "
            f"2 + {leaves} per layer; found {len(names)}"
            + (f", unexpected names {bad[:3]}" if bad else "")
            + (f", missing tensor{gaps[0]:05d}_000" if gaps else ""))
    return (len(numbers) - 2) // leaves


def _shape(ckpt_dir: Path, index: int, part: str | None = None) -> tuple[int, ...]:
    path = ckpt_dir / f"tensor{index:05d}_000"
    obj = load_tensor_file(path, mmap=True)
    if part is not None:
        if not isinstance(obj, QuantizedWeight8bit):
            raise CheckpointError(f"{path}: expected a QuantizedWeight8bit, found an array")
        obj = getattr(obj, part)
    elif isinstance(obj, QuantizedWeight8bit):
        obj = obj.weight
    return tuple(obj.shape)


def _shapes_signature(ckpt_dir: Path) -> dict[str, int]:
    """The shape numbers, from files 0 (embeddings) and 2..13 (layer 0)."""
    role_index = {role: 2 + i for i, (_, role) in enumerate(LAYER_LEAVES)}
    try:
        vocab, emb = _shape(ckpt_dir, 0)
        experts, _, ffn = _shape(ckpt_dir, role_index["gate"])
        blocks = _shape(ckpt_dir, role_index["down"], "scales")[-2]
        q_width = _shape(ckpt_dir, role_index["q"])[-1]
        kv_width = _shape(ckpt_dir, role_index["k"])[-1]
    except ValueError as e:          # wrong number of dimensions
        raise CheckpointError(f"{ckpt_dir}: tensor shapes are not Grok-1's ({e})") from None
    return {"vocab_size": vocab, "emb_size": emb, "num_layers": _num_layers(ckpt_dir),
            "ffn_size": ffn, "num_experts": experts, "scale_row_blocks": blocks,
            "q_width": q_width, "kv_width": kv_width}


def infer_config(ckpt_dir: str | os.PathLike) -> GrokConfig:
    """The config of a checkpoint, from its file count and shapes.

    Heads and key size (only their products show in shapes) and the scalars
    come from the preset with the same shapes: exact first, else with another
    layer count. Raises CheckpointError when no preset fits.
    """
    ckpt_dir = Path(ckpt_dir)
    found = _shapes_signature(ckpt_dir)
    for cfg in PRESETS.values():
        if shape_signature(cfg) == found:
            return cfg
    for cfg in PRESETS.values():
        if shape_signature(cfg) == {**found, "num_layers": cfg.num_layers}:
            return dataclasses.replace(cfg, num_layers=found["num_layers"])
    shown = ", ".join(f"{k} {v}" for k, v in found.items())
    raise CheckpointError(f"{ckpt_dir}: its shapes ({shown}) match no preset; give the "
                          f"config (a JSON object of GrokConfig fields) explicitly")


def _first_non_finite(a: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first NaN or infinity of a float array (scanned in bounded chunks)."""
    flat, step = a.reshape(-1), 1 << 22
    for start in range(0, flat.size, step):
        bad = ~np.isfinite(flat[start:start + step].astype(np.float32))
        if bad.any():
            return tuple(int(i) for i in np.unravel_index(start + int(np.argmax(bad)), a.shape))
    return None


def check_finite(path: Path, spec: WeightSpec, value) -> None:
    """Refuse NaN/Inf in scales, embeddings, norms and router (int8 values cannot be
    non-finite): stored as they are, they would turn every logit into NaN."""
    parts = [(" scales", value.scales)] if spec.quantized else [("", value)]
    for what, array in parts:
        index = _first_non_finite(array)
        if index is not None:
            raise CheckpointError(f"{path}: {spec.name}{what}: non-finite value "
                                  f"{array[index]} at index {list(index)}; the checkpoint is "
                                  f"damaged")


def check_checkpoint(ckpt_dir: str | os.PathLike, cfg: GrokConfig) -> None:
    """Exactly the files ``cfg`` expects, each holding its leaf's kind, dtype and shape,
    with finite scales, embeddings, norms and router.

    Reads headers, and of the payloads only the floats (3.3 GB of 318 for
    Grok-1, mostly the embeddings); int8 values are mapped, not read.
    """
    ckpt_dir = Path(ckpt_dir)
    check_checkpoint_dir(ckpt_dir, cfg)
    expected = {s.filename for s in checkpoint_specs(cfg)}
    extra = [n for n in tensor_files(ckpt_dir) if n not in expected]
    if extra:
        layers = _num_layers(ckpt_dir) if _TENSOR_FILE.fullmatch(extra[0]) else "?"
        raise CheckpointError(
            f"{ckpt_dir}: {len(extra)} tensor file(s) the config does not expect ({extra[0]} "
            f"...): the config has {cfg.num_layers} layers ({num_checkpoint_files(cfg)} "
            f"files), the checkpoint {layers}; omit the config to use the checkpoint's own")
    for spec in checkpoint_specs(cfg):
        check_finite(ckpt_dir / spec.filename, spec, read_tensor(ckpt_dir, spec, mmap=True))


def resolve_config(ckpt_dir: str | os.PathLike, given: GrokConfig | None) -> GrokConfig:
    """``given`` checked against the checkpoint, or the inferred config when None."""
    cfg = infer_config(ckpt_dir) if given is None else given
    check_checkpoint(ckpt_dir, cfg)
    return cfg
