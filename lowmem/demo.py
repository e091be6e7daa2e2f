"""The embedded default: a small synthetic Grok-1, made on the spot, no downloads.

The 'demo' preset keeps Grok-1's structure (8 experts, top-2, grouped-query
attention, 8-row-block scales) and its real 131072-piece vocabulary, so the
release's tokenizer (bundled with the package) works end to end. The weights
are random: the text it generates is meaningless. Building it takes about a
minute and is done once per work directory; each stage says so on stderr.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lowmem.cli import stage
from lowmem.tokenizer import release_tokenizer_path
from quant.config import preset
from quant.packed import MANIFEST, QuantSettings

log = logging.getLogger(__name__)
DEMO_PRESET = "demo"
DEMO_BITS = 4


def _demo_settings() -> QuantSettings:
    """The quantizer's defaults for int4: the demo runs what a user's model would."""
    from quant.pipeline import settings_for
    return settings_for(DEMO_BITS)


def _current(model_dir: Path) -> bool:
    """Whether a demo model directory opens with this version's reader (format, seal)
    and holds the current default settings."""
    from quant.packed import PackedFormatError, PackedModel
    try:
        return PackedModel.open(model_dir).settings == _demo_settings()
    except PackedFormatError:
        return False


def ensure_demo_model(workdir: str | os.PathLike, progress=None) -> Path:
    """Write (once) the synthetic checkpoint and its packed int4 model under ``workdir``.

    ``progress``: a ``quant.pipeline.Progress`` for the quantizing stage (a bar).
    """
    from quant.pipeline import quantize_checkpoint
    from quant.synthetic import write_checkpoint

    workdir = Path(workdir)
    model_dir = workdir / f"demo-int{DEMO_BITS}"
    if (model_dir / MANIFEST).is_file():
        if _current(model_dir):
            return model_dir
        stage("%s was written by another lowmem version or settings: rebuilding it", model_dir)
        shutil.rmtree(model_dir)
    tokenizer = release_tokenizer_path()
    cfg = preset(DEMO_PRESET)
    ckpt = workdir / "demo-ckpt-0"
    if not ckpt.is_dir():
        stage("writing a synthetic Grok-1 checkpoint (%d layers, random weights) to %s: "
              "once, kept for later runs", cfg.num_layers, ckpt)
        tmp = workdir / "demo-ckpt-0.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        write_checkpoint(cfg, tmp, seed=0)
        os.replace(tmp, ckpt)
    stage("quantizing it to int%d in %s: once, kept for later runs", DEMO_BITS, model_dir)
    try:
        quantize_checkpoint(ckpt, model_dir, cfg, _demo_settings(),
                            tokenizer=tokenizer, resume=True, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    return model_dir
