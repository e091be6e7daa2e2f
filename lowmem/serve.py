"""``python -m lowmem.serve``: an OpenAI-compatible HTTP server with continuous batching.

    python -m lowmem.serve                      # the embedded default, on 127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "The answer is", "max_tokens": 16, "temperature": 0}'

Concurrent requests share decode steps (``lowmem.scheduler``): each expert a
step needs is loaded once for every sequence routed to it. Endpoints:
POST /v1/completions, /v1/chat/completions (streaming with "stream": true),
GET /v1/models, /health, /metrics (Prometheus text).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
import uuid
from pathlib import Path

from fastapi import Request as HttpRequest   # module level: FastAPI resolves annotations here

from lowmem import cli
from lowmem.cli import add_engine_arguments
from lowmem.engine import EngineError
from lowmem.openai_api import (CHAT_STOP, CHAT_TEMPLATE_DOC, ApiError, chat_logprobs,
                               chat_prompt, common_params, completion_logprobs,
                               completion_prompt)
from lowmem.scheduler import QueueFull, Request, Scheduler
from lowmem.tokenizer import TextAssembler

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.2      # how often a non-streaming request checks its client


def _error(exc: ApiError, headers: dict | None = None):
    from fastapi.responses import JSONResponse
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class Generation:
    """One request in flight: events from the scheduler's thread into this event loop."""

    def __init__(self, server: "Server", prompt_ids: list[int], params: dict,
                 logprobs: int | None):
        # logprobs: None (off) or the alternatives reported per token (0 = the chosen only)
        self.server, self.params, self.logprobs = server, params, logprobs
        self.prompt_ids = prompt_ids
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.text = TextAssembler(server.tokenizer, params["stops"], prompt_ids)
        self.tokens, self.token_logprobs, self.finish_reason = [], [], None
        req = Request(tuple(prompt_ids), params["max_tokens"], params["sampling"],
                      params["seed"], top_logprobs=logprobs or 0)
        try:
            self.seq = server.scheduler.submit(req, self._on_event)
        except QueueFull as e:
            raise ApiError(f"server busy: {e}; retry later", status=429,
                           kind="rate_limit_error") from None
        except EngineError as e:
            raise ApiError(str(e), "prompt" if "prompt" in str(e) else None) from None

    def _on_event(self, event) -> None:   # scheduler thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def pieces(self):
        """Yield (text, token_ids, [(logprob, top alternatives)]) as they come; sets
        ``finish_reason``."""
        try:
            while True:
                kind, value, *rest = await self.events.get()
                if kind == "error":
                    raise RuntimeError(value)
                if kind == "done":
                    self.finish_reason = value   # 'stop', 'length' or 'cancelled' (shutdown)
                    tail = self.text.flush()
                    if tail:
                        yield tail, [], []
                    return
                logprob = (rest[0], rest[1])          # token events: (logprob, top)
                self.tokens.append(value)
                self.token_logprobs.append(logprob)
                piece = self.text.push(value)
                if self.text.stopped:
                    self.finish_reason = "stop"
                    self.server.scheduler.cancel(self.seq)
                    yield piece, [value], [logprob]
                    return
                yield piece, [value], [logprob]
        finally:
            self.server.scheduler.cancel(self.seq)   # no-op when finished

    def usage(self) -> dict:
        p, c = len(self.prompt_ids), len(self.tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Server:
    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str):
        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        self.created = int(time.time())

    def token_text(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.sp.id_to_piece(i) for i in ids]

    @staticmethod
    def _chat_logprob(piece: str, logprob: float) -> dict:
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    def completion_choice(self, gen: Generation, text: str, ids, logprobs, chat: bool,
                          delta: bool, finish) -> dict:
        if chat:
            lp = ({"content": [{**self._chat_logprob(t, v),
                                "top_logprobs": [self._chat_logprob(self.token_text([i])[0], w)
                                                 for i, w in top]}
                               for t, (v, top) in zip(self.token_text(ids), logprobs)]}
                  if gen.logprobs is not None else None)
            key = "delta" if delta else "message"
            return {"index": 0, key: {"role": "assistant", "content": text},
                    "logprobs": lp, "finish_reason": finish}
        lp = None
        if gen.logprobs is not None:
            top = ([{self.token_text([i])[0]: w for i, w in alts} for _, alts in logprobs]
                   if gen.logprobs else None)
            lp = {"tokens": self.token_text(ids), "token_logprobs": [v for v, _ in logprobs],
                  "top_logprobs": top, "text_offset": None}
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}

    def envelope(self, chat: bool, stream: bool, rid: str, choices: list) -> dict:
        obj = ("chat.completion" if chat else "text_completion") + (".chunk" if stream and chat
                                                                     else "")
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name,
                "choices": choices}

    async def respond(self, request, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            return _error(ApiError("the request body is not valid JSON"))
        try:
            params = common_params(body, self.scheduler.batch.context)
            if chat:
                prompt = self.tokenizer.encode(chat_prompt(body))
                params["stops"] = params["stops"] + (CHAT_STOP,)
                logprobs = chat_logprobs(body)
            else:
                prompt, logprobs = completion_prompt(body, self.tokenizer), completion_logprobs(body)
            gen = Generation(self, prompt, params, logprobs)
        except ApiError as e:
            return _error(e, {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if params["stream"]:
            return StreamingResponse(self._stream(gen, chat, rid), media_type="text/event-stream")
        text, ids, lps = [], [], []
        watcher = asyncio.create_task(self._cancel_on_disconnect(request, gen))
        try:
            async for piece, t, lp in gen.pieces():
                text.append(piece)
                ids += t
                lps += lp
        except RuntimeError as e:
            return _error(ApiError(str(e), status=500, kind="server_error"))
        finally:
            watcher.cancel()
        choice = self.completion_choice(gen, "".join(text), ids, lps, chat, False,
                                        gen.finish_reason)
        out = self.envelope(chat, False, rid, [choice])
        out["usage"] = gen.usage()
        return JSONResponse(out)

    async def _cancel_on_disconnect(self, request, gen: Generation) -> None:
        """A non-streaming client that hangs up frees its KV slot within a step or so."""
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self.scheduler.cancel(gen.seq)

    async def _stream(self, gen: Generation, chat: bool, rid: str):
        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"
        try:
            async for piece, ids, lps in gen.pieces():
                if piece or ids:
                    choice = self.completion_choice(gen, piece, ids, lps, chat, True, None)
                    yield event(self.envelope(chat, True, rid, [choice]))
            last = self.completion_choice(gen, "", [], [], chat, True, gen.finish_reason)
            if chat:
                last["delta"] = {}
            yield event(self.envelope(chat, True, rid, [last]))
            if gen.params["include_usage"]:
                yield event({**self.envelope(chat, True, rid, []), "usage": gen.usage()})
        except RuntimeError as e:
            yield event(ApiError(str(e), status=500, kind="server_error").body())
        yield "data: [DONE]\n\n"

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "lowmem", "context_length": self.scheduler.batch.context,
            "base_model": True, "chat_template": CHAT_TEMPLATE_DOC}]}

    def metrics_text(self) -> str:
        lines = []
        for name, value in self.scheduler.metrics().items():
            if value is None:
                continue
            kind = "counter" if name.endswith("_total") else "gauge"
            text = str(value) if isinstance(value, int) else f"{value:.6g}"
            lines += [f"# TYPE lowmem_{name} {kind}", f"lowmem_{name} {text}"]
        return "\n".join(lines) + "\n"


def _log_ready(scheduler: Scheduler):
    def report(seconds):
        if seconds is not None:
            cli.stage("warm-up: compiled every step shape (batch sizes %s, prefill buckets %s) "
                      "in %.1f s; ready", scheduler.batch.batch_sizes,
                      scheduler.batch.engine.options.prefill_buckets, seconds)
    return report


def create_app(scheduler: Scheduler, tokenizer, model_name: str = "lowmem",
               warm_up: bool = True):
    """The FastAPI app; it starts the scheduler's worker and shuts it down with the app.

    With ``warm_up`` the worker first compiles every step shape; until then
    /health answers 503 "starting" and completions 503 with Retry-After."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse

    server = Server(scheduler, tokenizer, model_name)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start(warm_up, _log_ready(scheduler))
        yield
        await asyncio.to_thread(scheduler.shutdown)

    app = FastAPI(title="lowmem", lifespan=lifespan)
    app.state.server = server

    def starting():
        return _error(ApiError("the server is starting (compiling its step shapes); retry "
                               "later", status=503, kind="server_error"),
                      {"Retry-After": str(RETRY_AFTER_S)})

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        if not scheduler.ready.is_set():
            return starting()
        return await server.respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        if not scheduler.ready.is_set():
            return starting()
        return await server.respond(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return JSONResponse(server.models())

    @app.get("/health")
    async def health():
        if not scheduler.ready.is_set():
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    return app


def build_parser(prog: str = "python -m lowmem.serve") -> argparse.ArgumentParser:
    p = cli.Parser(prog=prog, description=__doc__, formatter_class=cli.HelpFormatter)
    cli.add_model_argument(p, "the embedded synthetic model, built once")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=cli.int_type(0, 65535), default=8000,
                   help="port, 0..65535 (default 8000)")
    p.add_argument("--max-batch", type=cli.int_type(1, 128), default=8,
                   help="sequences decoded together, each with its own KV cache slot, 1..128 "
                        "(default 8)")
    p.add_argument("--max-queue", type=cli.int_type(1), default=64,
                   help="requests waiting for a slot before new ones get 429, >= 1 (default 64)")
    p.add_argument("--prefill-tokens", type=cli.int_type(1), default=None,
                   help="prompt tokens one step may read beside the running decodes, >= 1 "
                        "(default: the largest prefill bucket, 256): more reads a burst of "
                        "prompts in fewer steps, less keeps each step of the running streams "
                        "short")
    p.add_argument("--batch-wait-ms", type=cli.float_type(0.0, 10000.0), default=20.0,
                   metavar="MS",
                   help="when idle, how long a new request waits for others to join its "
                        "first step, 0..10000 (default 20; 0 = start at once): a burst whose "
                        "clients arrive a few ms apart is then read in one step, not the "
                        "first request alone and the rest one prefill step later")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="start at once and compile each step shape when a request first "
                        "needs it (default: compile them all before /health says ok)")
    p.add_argument("--model-name", default=None, help="the id /v1/models reports "
                   "(default: the model directory's name)")
    add_engine_arguments(p)
    cli.add_workdir_argument(p)
    cli.add_verbosity(p)
    return p


def main(argv=None, prog: str = "python -m lowmem.serve") -> int:
    args = build_parser(prog).parse_args(argv)
    cli.setup_cli(args)
    return cli.run_main(_serve, args)


def _serve(args) -> int:
    import uvicorn

    from lowmem.batch import BatchEngine
    runtime = cli.open_runtime(args)
    try:
        if runtime.tokenizer is None:
            raise EngineError(f"{runtime.engine.model.model_dir}: no tokenizer.model in the "
                              f"model directory; the server needs one to read and write text")
        batch = BatchEngine(runtime.engine, args.max_batch)
        scheduler = Scheduler(batch, args.max_queue, args.prefill_tokens,
                              args.batch_wait_ms / 1e3)
        name = args.model_name or Path(str(runtime.engine.model.model_dir)).name
        app = create_app(scheduler, runtime.tokenizer, name, warm_up=args.warmup)
        cli.stage("serving %s on http://%s:%d/v1 (max batch %d, queue %d)", name, args.host,
                  args.port, args.max_batch, args.max_queue)
        # uvicorn handles SIGTERM/SIGINT (stop accepting, let streams finish for up to
        # 10 s, then the app's shutdown cancels what is left) and re-raises the signal to
        # the handler it found: this one, so that we close the engine and exit 0.
        signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: shut down"))
        uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=10,
                    log_level="info" if args.verbose else "warning")
    finally:
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
