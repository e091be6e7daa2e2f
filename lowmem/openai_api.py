"""The OpenAI wire format: request validation, the chat template, text with stop strings.

Kept apart from the HTTP server (``lowmem.serve``) so it is plain functions
on dicts. Validation raises ``ApiError`` with the offending field; the server
turns it into a 400 with an OpenAI-style error body.

Grok-1 is a base model, so ``/v1/chat/completions`` renders the messages
with a plain-text template (``CHAT_TEMPLATE_DOC``) and stops at the next
turn's marker.
"""
from __future__ import annotations

import math

from lowmem.batch import TOP_LOGPROBS_MAX
from lowmem.sampling import SamplingParams
from lowmem.tokenizer import Tokenizer

MAX_STOPS = 4
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"
CHAT_TEMPLATE_DOC = ("plain text: each message as '<Role>: <content>' followed by a blank line "
                     "(roles System, User, Assistant), then 'Assistant:'; generation stops at "
                     f"{CHAT_STOP!r}")


class ApiError(ValueError):
    """A request the API refuses: HTTP status, message, and the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": None}}


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(f"'{name}' must be {kind} in [{low}, {high}], got {value!r}", name)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of "
                       f"them, got {stop!r}", "stop")
    return tuple(stops)


def common_params(body, max_tokens_limit: int) -> dict:
    """The settings both endpoints share, validated; ``n`` > 1 and ``echo`` are refused."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    if _number(body, "n", 1, 1, 1_000_000, integer=True) != 1:
        raise ApiError("only n=1 is supported (send several requests instead)", "n")
    if body.get("echo"):
        raise ApiError("'echo' is not supported", "echo")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(f"'stream' must be a boolean, got {stream!r}", "stream")
    sampling = SamplingParams(   # the ranges checked here are within SamplingParams'
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
        top_k=int(_number(body, "top_k", 0, 0, 1 << 30, integer=True)))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("'stream_options' must be an object", "stream_options")
    return dict(
        max_tokens=_number(body, "max_tokens", 16, 1, max_tokens_limit, integer=True),
        sampling=sampling,
        seed=_number(body, "seed", 0, -(1 << 63), (1 << 63) - 1, integer=True),
        stops=_stops(body), stream=stream,
        include_usage=bool(options.get("include_usage", False)))


def completion_prompt(body: dict, tokenizer: Tokenizer | None) -> list[int]:
    """Token ids of a /v1/completions prompt: a string, a list of ids, or a list of one of them."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ApiError("this model has no tokenizer: send 'prompt' as a list of token ids",
                           "prompt")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                        for t in prompt):
        return list(prompt)
    raise ApiError("'prompt' must be a string or a list of token ids (one prompt; batches of "
                   "prompts are not supported)", "prompt")


def completion_logprobs(body: dict) -> int | None:
    """/v1/completions ``logprobs``: None (off) or N >= 0, the chosen token's
    log-probability plus the N likeliest alternatives at each position."""
    value = body.get("logprobs")
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= TOP_LOGPROBS_MAX:
        raise ApiError(f"'logprobs' must be an integer in [0, {TOP_LOGPROBS_MAX}] (the chosen "
                       f"token's log-probability and that many alternatives), got {value!r}",
                       "logprobs")
    return value


def chat_prompt(body: dict) -> str:
    """The plain-text rendering of ``messages`` (see CHAT_TEMPLATE_DOC)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", "messages")
    parts = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES
                and isinstance(m.get("content"), str)):
            raise ApiError(f"messages[{i}] must be an object with 'role' (one of "
                           f"{sorted(CHAT_ROLES)}) and string 'content'", f"messages[{i}]")
        parts.append(f"{CHAT_ROLES[m['role']]}: {m['content']}\n\n")
    return "".join(parts) + "Assistant:"


def chat_logprobs(body: dict) -> int | None:
    """/v1/chat/completions ``logprobs`` (bool) and ``top_logprobs`` (0..20, needs
    ``logprobs``): None (off) or the number of alternatives per token."""
    value = body.get("logprobs", False)
    if value is None:
        value = False
    if not isinstance(value, bool):
        raise ApiError(f"'logprobs' must be a boolean, got {value!r}", "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if value else None
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= TOP_LOGPROBS_MAX:
        raise ApiError(f"'top_logprobs' must be an integer in [0, {TOP_LOGPROBS_MAX}], "
                       f"got {top!r}", "top_logprobs")
    if not value:
        raise ApiError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return top
