"""The release's tokenizer, and text streamed from token ids as they arrive.

Grok-1's tokenizer is a SentencePiece BPE model with byte fallback and 131072
pieces (``tokenizer.model`` from the release, copied into a model directory by
the quantizer).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

# The release's tokenizer.model (Apache-2.0, like the weights), shipped with the
# package so that the embedded default and the tests need no download.
BUNDLED = Path(__file__).parent / "data" / "tokenizer.model"


def release_tokenizer_path() -> Path:
    """$LOWMEM_TOKENIZER if set, else the copy of the release tokenizer in the package."""
    env = os.environ.get("LOWMEM_TOKENIZER")
    return Path(env) if env else BUNDLED


class TokenizerError(ValueError):
    """A tokenizer file cannot be read, or text cannot be encoded."""


class Tokenizer:
    """The release's SentencePiece model (BPE, byte fallback, 131072 pieces)."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: expected a sentencepiece model, found unreadable "
                                 f"data ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of text; text that is not valid Unicode (lone surrogates, as from
        undecodable bytes) is a TokenizerError, not sentencepiece's cast error."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"the prompt is not valid UTF-8 text ({e.reason} at "
                                 f"character {e.start})") from None
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def _held_back(text: str, stops: Iterable[str]) -> int:
    """How many trailing characters might be the start of a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold


def stream_text(tokenizer: Tokenizer, tokens: Iterable[int], stops: tuple[str, ...] = (),
                context: list[int] = ()) -> Iterator[str]:
    """Text pieces as tokens arrive; ends at (and excludes) the first stop string.

    Decoding the whole sequence each time keeps multi-byte characters split
    across byte-fallback tokens intact; an incomplete one is held back. The
    sequence is decoded after a few ``context`` (prompt) tokens, because
    SentencePiece drops the leading space of a sequence's first piece.
    """
    context = list(context)[-8:]
    skip = len(tokenizer.decode(context))
    decode = lambda ids: tokenizer.decode(context + ids)[skip:]  # noqa: E731
    ids: list[int] = []
    emitted = 0
    for token in tokens:
        ids.append(token)
        text = decode(ids)
        cut = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = len(text) - _held_back(text, stops)
        while safe > emitted and text[safe - 1] == "\ufffd":   # an incomplete character
            safe -= 1
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = decode(ids)
    if len(text) > emitted:
        yield text[emitted:]
