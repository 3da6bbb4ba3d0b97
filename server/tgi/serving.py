"""TGI family logic: /generate, /generate_stream, /tokenize and /info on top of an engine's vLLM OpenAI API.

A generate request becomes one ``POST /v1/completions`` (see translate.py); vLLM's errors become hubserve's
exceptions (server/errors.py gives them TGI's shape). Streams hold the engine's admission until they end;
once an SSE stream has started, an error goes out as one ``data:{"error","error_type"}`` event and the stream
ends, as TGI does.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from server.engines.base import Admission, Engine
from server.engines.client import engine_error, error_message, lost, post_engine, read_json
from server.errors import (
    Family,
    GenerationError,
    IncompleteGeneration,
    InvalidRequest,
    ServerError,
    sse_error_event,
)
from server.ops.context import engine_headers, note_tokens
from server.proxy import RelayResponse
from server.tasks.catalog import GENERATIVE_TASKS
from server.tasks.tokenizer import check_input_size, off_loop
from server.tgi.protocol import (
    GenerateRequest,
    GenerateResponse,
    Info,
    SimpleToken,
    StreamResponse,
    TokenizeRequest,
    parse_generate,
)
from server.tgi.tokens import TokenTexts
from server.tgi.translate import StreamTranslator, completion_body, generate_response

if TYPE_CHECKING:
    from server.registry import Registry

log = logging.getLogger("hubserve.tgi")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dump_generate(response: GenerateResponse) -> dict[str, Any]:
    """TGI's JSON: ``details`` only when asked, ``top_tokens``/``best_of_sequences`` only when present."""
    data = response.model_dump(exclude={"details"})
    if response.details is not None:
        details = response.details.model_dump()
        for key in ("top_tokens", "best_of_sequences"):
            if details.get(key) is None:
                details.pop(key)
        for seq in details.get("best_of_sequences") or []:
            if seq.get("top_tokens") is None:
                seq.pop("top_tokens")
        data["details"] = details
    return data


def dump_event(event: StreamResponse) -> bytes:
    data = event.model_dump()
    if data.get("top_tokens") is None:
        data.pop("top_tokens")
    return b"data:" + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class TGIService:
    """Runs TGI requests against engines; caches per-model token tables (special ids, tokenizer)."""

    def __init__(self, registry: Registry, version: str | None = None) -> None:
        self.registry = registry
        self.version = version or _version()
        self._vocab: dict[str, TokenTexts] = {}

    async def vocab(self, engine: Engine) -> TokenTexts:
        """The model's token table, loaded once per snapshot in a thread (a big tokenizer.json takes a while)."""
        key = engine.info.snapshot
        if key not in self._vocab:
            self._vocab[key] = await asyncio.to_thread(TokenTexts.from_snapshot, key)
        return self._vocab[key]

    # ---- engine calls -------------------------------------------------------------------------------
    async def _post(self, engine: Engine, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = (await post_engine(engine, path, body)).json()
        if not isinstance(data, dict):
            raise GenerationError(f"Unexpected answer from the engine on {path}.")
        return data

    async def _max_new_tokens(self, engine: Engine, request: GenerateRequest) -> int:
        """The request's max_new_tokens, or (like TGI) whatever room the context leaves after the input.

        The input is tokenized here only when needed: no max_new_tokens, or one that cannot fit whatever the
        input (then the error names both counts, as TGI's does). Otherwise vLLM checks the total itself.
        """
        wanted = request.parameters.max_new_tokens
        cap = self.registry.settings.max_new_tokens
        if wanted is not None and cap is not None and wanted > cap:
            raise InvalidRequest(
                f"`max_new_tokens` must be <= {cap} on this server (HUBSERVE_MAX_NEW_TOKENS). Given: {wanted}"
            )
        if wanted is not None and (engine.max_model_len is None or wanted < engine.max_model_len):
            return wanted
        data = await self._post(engine, "/tokenize", {"model": engine.model_id, "prompt": request.inputs})
        count = int(data.get("count") or len(data.get("tokens") or []))
        total = int(data.get("max_model_len") or engine.max_model_len or 0)
        if request.parameters.truncate is not None:
            count = min(count, request.parameters.truncate)
        if wanted is not None and count + wanted > total:
            raise InvalidRequest(
                f"`inputs` tokens + `max_new_tokens` must be <= {total}. "
                f"Given: {count} `inputs` tokens and {wanted} `max_new_tokens`"
            )
        if count >= total:
            raise InvalidRequest(f"`inputs` must have less than {total} tokens. Given: {count}")
        return wanted if wanted is not None else min(total - count, cap or total)

    @staticmethod
    def _require_generative(engine: Engine) -> None:
        if engine.info.task not in GENERATIVE_TASKS or engine.backend == "transformers":
            raise InvalidRequest(
                f"Model `{engine.info.name}` ({engine.info.task}) does not generate text; "
                "name a text-generation model (e.g. POST /models/{repo_id})."
            )

    # ---- generate -----------------------------------------------------------------------------------
    def _with_adapter(self, engine: Engine, request: GenerateRequest) -> Engine:
        """TGI's ``parameters.adapter_id``: the adapter of the routed model that should answer (422 otherwise)."""
        adapter_id = request.parameters.adapter_id
        if adapter_id is None or adapter_id in engine.info.served_names:
            return engine
        return self.registry.adapter_of(engine, adapter_id)

    async def generate(self, engine: Engine, request: GenerateRequest) -> GenerateResponse:
        engine = self._with_adapter(engine, request)
        self._require_generative(engine)
        async with self.registry.using(engine) as engine:
            max_new = await self._max_new_tokens(engine, request)
            body = completion_body(request, engine.model_id, max_new, stream=False)
            completion = await self._post(engine, "/v1/completions", body)
        return generate_response(request, completion, await self.vocab(engine))

    async def open_stream(self, engine: Engine, request: GenerateRequest) -> StreamingResponse:
        """Start a stream; errors until vLLM's first byte are raised (an HTTP error), later ones are events.

        The response frees the admission and the upstream connection however it ends, even when the client
        leaves before the first event (then the body generator never runs, so its ``finally`` cannot).
        """
        engine = self._with_adapter(engine, request)
        self._require_generative(engine)
        params = request.parameters
        if (params.best_of or 1) > 1:
            raise InvalidRequest("`best_of` != 1 is not allowed for this endpoint")
        if params.decoder_input_details:
            raise InvalidRequest("`decoder_input_details` == true is not supported when streaming tokens")
        slot = await self.registry.admit(engine)
        engine = slot.engine  # after a swap: the new revision's engine, with its own token table
        try:
            translator = StreamTranslator(request, await self.vocab(engine))
            max_new = await self._max_new_tokens(engine, request)
            body = completion_body(request, engine.model_id, max_new, stream=True)
            client = engine.client()
            try:
                upstream_request = client.build_request("POST", "/v1/completions", json=body, headers=engine_headers())
                upstream = await client.send(upstream_request, stream=True)
            except httpx.TransportError as e:
                raise lost(engine, e) from e
            if upstream.status_code >= 400:
                content = await upstream.aread()
                await upstream.aclose()
                raise engine_error(upstream.status_code, content)
        except BaseException:
            slot.release()
            raise
        return RelayResponse(
            self._relay(engine, translator, upstream, slot),
            upstream=upstream,
            slot=slot,
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )

    async def _relay(
        self, engine: Engine, translator: StreamTranslator, upstream: httpx.Response, slot: Admission
    ) -> AsyncIterator[bytes]:
        events = 0  # one event per generated token
        try:
            async for line in upstream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if isinstance(chunk, dict) and chunk.get("error"):
                    raise GenerationError(error_message(data.encode()) or "generation failed")
                for event in translator.feed(chunk):
                    events += 1
                    yield dump_event(event)
            if not translator.finished:
                raise IncompleteGeneration("The engine ended the stream before the generation finished.")
        except ServerError as e:
            yield sse_error_event(e, Family.TGI)
        except httpx.TransportError as e:
            log.warning("model %s: stream broken: %s", engine.info.name, type(e).__name__)
            yield sse_error_event(lost(engine, e), Family.TGI)
        except ValueError as e:  # undecodable chunk
            yield sse_error_event(GenerationError(f"Unreadable answer from the engine: {e}"), Family.TGI)
        finally:
            note_tokens(None, events)
            slot.release()
            await upstream.aclose()

    # ---- tokenize and info --------------------------------------------------------------------------
    async def tokenize(self, engine: Engine, request: TokenizeRequest) -> list[SimpleToken]:
        """TGI's /tokenize: ids with the text and character span of ``inputs`` each covers."""
        check_input_size([request.inputs], self.registry.settings.max_tokenize_chars)
        vocab = await self.vocab(engine)
        spans = await off_loop(vocab.offsets, request.inputs)  # the bounded tokenizer pool: inputs can be big
        if spans is not None:
            return [SimpleToken(id=i, text=request.inputs[s:e], start=s, stop=e) for i, s, e in spans]
        async with self.registry.using(engine) as engine:  # no local tokenizer: vLLM's ids and strings
            data = await self._post(
                engine, "/tokenize", {"model": engine.model_id, "prompt": request.inputs, "return_token_strs": True}
            )
        out, pos = [], 0
        for tid, piece in zip(data.get("tokens") or [], data.get("token_strs") or [], strict=False):
            start = min(pos, len(request.inputs))
            pos = start + len(piece)
            out.append(SimpleToken(id=tid, text=piece, start=start, stop=min(pos, len(request.inputs))))
        return out

    def info(self, engine: Engine) -> Info:
        total = engine.max_model_len
        return Info(
            model_id=engine.info.repo,
            model_sha=engine.info.commit,
            model_pipeline_tag=engine.info.task,
            model_dtype=str(engine.info.engine_args.get("dtype")) if engine.info.engine_args.get("dtype") else None,
            max_concurrent_requests=engine.max_in_flight,
            max_input_tokens=total - 1 if total else None,
            max_total_tokens=total,
            version=self.version,
            sha=engine.info.commit,
        )


def _version() -> str:
    try:
        return importlib.metadata.version("hubserve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


# ---- the app's service ---------------------------------------------------------------------------------------


def tgi_service(request: Request) -> TGIService:
    """The app's TGIService, made on first use (it holds nothing but per-model token tables)."""
    service = getattr(request.app.state, "tgi", None)
    if service is None:
        service = request.app.state.tgi = TGIService(request.app.state.registry, request.app.version)
    return service


async def hub_text_generation(request: Request, engine: Engine) -> Response:
    """The Hub Inference API's text-generation task (``POST /models/{repo}``, ``/``, ``/v1``): TGI's ``POST /``.
    app.py hands it to the Hub family, which does not import this one."""
    request.state.api_family = Family.TGI  # from here on errors carry TGI's error_type
    generate = parse_generate(await read_json(request))
    service = tgi_service(request)
    if generate.stream:
        return await service.open_stream(engine, generate)
    return JSONResponse([dump_generate(await service.generate(engine, generate))])
