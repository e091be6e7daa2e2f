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


class TextAssembler:
    """Text pieces as tokens arrive, ending at (and excluding) the first stop string.

    Decoding the whole sequence each time keeps multi-byte characters split
    across byte-fallback tokens intact; an incomplete one is held back, and so
    is a possible start of a stop string. The sequence is decoded after a few
    ``context`` (prompt) tokens, because SentencePiece drops the leading space
    of a sequence's first piece. Fed one token at a time (the server's tokens
    come from the scheduler's thread); ``stream_text`` is its generator form.
    """

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...], context: list[int]):
        self.tok, self.stops = tokenizer, stops
        self.context = list(context)[-8:]
        self.skip = len(tokenizer.decode(self.context))
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def _text(self) -> str:
        return self.tok.decode(self.context + self.ids)[self.skip:]

    def push(self, token: int) -> str:
        """The new text this token makes safe to send ('' if none); sets ``stopped``."""
        self.ids.append(token)
        text = self._text()
        cuts = [text.find(s, max(0, self.emitted - len(s))) for s in self.stops]
        cut = min((c for c in cuts if c >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            piece = text[self.emitted:cut] if cut > self.emitted else ""
            self.emitted = max(self.emitted, cut)
            return piece
        safe = len(text) - _held_back(text, self.stops)
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:safe], safe
        return piece

    def flush(self) -> str:
        """What is left when generation ends without a stop string."""
        if self.stopped:
            return ""
        text = self._text()
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def stream_text(tokenizer: Tokenizer, tokens: Iterable[int], stops: tuple[str, ...] = (),
                context: list[int] = ()) -> Iterator[str]:
    """Text pieces as tokens arrive; ends at (and excludes) the first stop string."""
    text = TextAssembler(tokenizer, stops, context)
    for token in tokens:
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            return
    tail = text.flush()
    if tail:
        yield tail
