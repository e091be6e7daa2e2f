"""The embedded default: a small synthetic Grok-1, made on the spot, no downloads.

The 'demo' preset keeps Grok-1's structure (8 experts, top-2, grouped-query
attention, 8-row-block scales) and its real 131072-piece vocabulary, so the
release's tokenizer works end to end. The weights are random: the text it
generates is meaningless. Building it takes seconds and is done once.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from quant.config import preset
from quant.packed import MANIFEST, QuantSettings

log = logging.getLogger(__name__)
DEMO_BITS = 4
DEMO_GROUP = 64


def find_tokenizer() -> Path | None:
    """The release tokenizer: $LOWMEM_TOKENIZER, or ../shared/grok1/ beside the checkout."""
    env = os.environ.get("LOWMEM_TOKENIZER")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "grok1" / "tokenizer.model" for p in here.parents[:3]]
    candidates.append(Path.cwd().parent / "shared" / "grok1" / "tokenizer.model")
    return next((c for c in candidates if c.is_file()), None)


def ensure_demo_model(workdir: str | os.PathLike) -> Path:
    """Write (once) the synthetic checkpoint and its packed int4 model under ``workdir``."""
    from quant.pipeline import quantize_checkpoint
    from quant.synthetic import write_checkpoint

    workdir = Path(workdir)
    model_dir = workdir / f"demo-int{DEMO_BITS}"
    if (model_dir / MANIFEST).is_file():
        return model_dir
    tokenizer = find_tokenizer()
    if tokenizer is None:
        raise FileNotFoundError("the embedded default needs the release tokenizer: set "
                                "LOWMEM_TOKENIZER=/path/to/tokenizer.model")
    cfg = preset("demo")
    ckpt = workdir / "demo-ckpt-0"
    if not ckpt.is_dir():
        log.info("writing synthetic checkpoint to %s", ckpt)
        tmp = workdir / "demo-ckpt-0.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        write_checkpoint(cfg, tmp, seed=0)
        os.replace(tmp, ckpt)
    log.info("quantizing to %s", model_dir)
    quantize_checkpoint(ckpt, model_dir, cfg, QuantSettings(DEMO_BITS, DEMO_GROUP),
                        tokenizer=tokenizer, resume=True)
    return model_dir
