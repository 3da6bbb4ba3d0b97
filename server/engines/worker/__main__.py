"""``python -m server.engines.worker``: load one model revision, then answer its Hub task on a Unix socket.

Routes (private; the gateway is the only client): ``GET /health`` (200 once the model is loaded: the socket
appears only then), ``GET /info``, ``POST /run`` (the Hub Inference API body of the model's task → the answer in
the Hub's shape; image and audio tasks take the gateway's normalized body, media in base64, and may answer
image or audio bytes), ``POST /rerank`` (cross-encoders: the Cohere/Jina/vLLM rerank shape). Errors:
``{"error"}`` with 400 for input that does not fit the task, 500 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from server.engines.worker import media
from server.engines.worker.batcher import Batcher
from server.engines.worker.runner import Runner, select_device
from server.errors import InvalidRequest
from server.tasks import answers as tasks
from server.tasks import requests as protocol
from server.tasks.media_requests import parse_media_task

log = logging.getLogger("hubserve.worker")
DEFAULT_TEMPLATE = "This example is {}."


class Worker:
    """The task handlers: validate the body, batch the model work, shape the answer."""

    def __init__(self, runner: Runner, name: str, max_batch: int, window_s: float) -> None:
        self.runner = runner
        self.name = name
        executor = ThreadPoolExecutor(1, thread_name_prefix="model")  # one batch at a time; torch uses the cores
        self.logits = Batcher(runner.logits, max_batch, window_s, executor)
        self.entities = Batcher(runner.entities, max_batch, window_s, executor)
        self.fill = Batcher(runner.fill, max_batch, window_s, executor)
        self.answers = Batcher(runner.answers, max_batch, window_s, executor)
        self.generate = Batcher(runner.generate, max_batch, window_s, executor)

    async def run(self, payload: Any) -> Any:
        task = self.runner.task
        if task == "text-ranking":
            raise InvalidRequest(f"Model `{self.name}` is a text-ranking model: POST /v1/rerank.")
        request = protocol.parse_task(task, payload, self.name)
        handler = getattr(self, "_" + task.replace("-", "_"))
        return await handler(request)

    async def _text_classification(self, r: protocol.TextClassificationRequest) -> Any:
        texts = [r.inputs] if isinstance(r.inputs, str) else r.inputs
        function = r.parameters.function_to_apply or self.runner.default_function()
        logits = await self.logits.submit(texts)
        return [tasks.classification(row, self.runner.id2label, function, r.parameters.top_k) for row in logits]

    async def _token_classification(self, r: protocol.TokenClassificationRequest) -> Any:
        texts = [r.inputs] if isinstance(r.inputs, str) else r.inputs
        options = protocol.token_classification_options(r, self.name, self.runner.max_len)
        out = await self.entities.submit(texts, options)
        return out[0] if isinstance(r.inputs, str) else out

    async def _fill_mask(self, r: protocol.FillMaskRequest) -> Any:
        texts = [r.inputs] if isinstance(r.inputs, str) else r.inputs
        top_k, targets = protocol.fill_mask_options(r, self.name, self.runner.tokenizer.mask_token)
        if targets and not self.runner.target_ids(list(targets)):
            raise InvalidRequest("None of `targets` is a token of this model's vocabulary.", param="targets")
        out = await self.fill.submit(texts, (top_k, targets))
        return out[0] if isinstance(r.inputs, str) else out

    async def _zero_shot_classification(self, r: protocol.ZeroShotRequest) -> Any:
        labels = tasks.parse_candidate_labels(r.parameters.candidate_labels)
        if not labels:
            raise InvalidRequest("`candidate_labels` must name at least one label.", param="candidate_labels")
        entail = tasks.entailment_id(self.runner.config.label2id or {})
        if entail < 0:
            raise InvalidRequest(f"Model `{self.name}` has no entailment label: it is not an NLI model.")
        template = r.parameters.hypothesis_template or DEFAULT_TEMPLATE
        logits = await self.logits.submit([[r.inputs, template.format(label)] for label in labels])
        return tasks.zero_shot(logits, labels, entail, bool(r.parameters.multi_label))  # type: ignore[arg-type]

    async def _question_answering(self, r: protocol.QuestionAnsweringRequest) -> Any:
        p = r.parameters
        top_k = p.top_k or 1
        key = (top_k, p.max_answer_len or 15, bool(p.handle_impossible_answer), p.doc_stride, p.max_seq_len,
               p.align_to_words is not False)
        (answers,) = await self.answers.submit([(r.inputs.question, r.inputs.context)], key)
        return answers[0] if top_k == 1 and answers else answers

    async def _seq2seq(self, r: protocol.Seq2SeqRequest) -> Any:
        if r.stream:
            raise InvalidRequest(f"Model `{self.name}` ({self.runner.task}) does not stream; send stream=false.")
        texts = [r.inputs] if isinstance(r.inputs, str) else r.inputs
        p = r.parameters
        kwargs = tuple(sorted(p.generate_kwargs().items()))
        return await self.generate.submit(texts, (kwargs, p.src_lang, p.tgt_lang, p.clean_up_tokenization_spaces,
                                                  p.truncation))

    _summarization = _translation = _text2text_generation = _seq2seq

    def batchers(self) -> tuple[Batcher[Any, Any], ...]:
        return (self.logits, self.entities, self.fill, self.answers, self.generate)

    async def rerank(self, payload: Any) -> Any:
        """vLLM's /rerank answer for a cross-encoder: relevance = sigmoid of the single logit."""
        if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
            raise InvalidRequest("A rerank request needs `query` (a string) and `documents` (a list).")
        documents = payload.get("documents")
        if not isinstance(documents, list) or not documents:
            raise InvalidRequest("`documents` must be a non-empty list of strings.", param="documents")
        texts = [d if isinstance(d, str) else d.get("text") if isinstance(d, dict) else None for d in documents]
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("`documents` must be strings or {\"text\": ...} objects.", param="documents")
        logits = await self.logits.submit([[payload["query"], t] for t in texts])
        scores = [tasks.relevance(row) for row in logits]
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        top_n = payload.get("top_n") or len(order)
        keep_docs = payload.get("return_documents", True) is not False
        results = [{"index": i, "relevance_score": scores[i]} | ({"document": {"text": texts[i]}} if keep_docs else {})
                   for i in order[: int(top_n)]]
        tokens = sum(len(self.runner.tokenizer(payload["query"], t)["input_ids"]) for t in texts if t)
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": payload.get("model") or self.name,
                "usage": {"total_tokens": tokens}, "results": results}


class MediaWorker:
    """Image, audio and table tasks: parse the normalized body, batch the model work (engines/worker/media.py)."""

    def __init__(self, model: media.MediaModel, name: str, max_batch: int, window_s: float, device: Any) -> None:
        self.model = model
        self.name = name
        self.device = device
        self.runner = self  # /info reads runner.info()
        executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.batcher = Batcher(model.run, max_batch, window_s, executor)

    async def run(self, payload: Any) -> Any:
        request = parse_media_task(self.model.task, payload, self.name)
        item, key = self.model.prepare(request)
        (answer,) = await self.batcher.submit([item], key)
        return answer

    def info(self) -> dict[str, Any]:
        return {"task": self.model.task, "device": str(self.device), "max_model_len": self.model.max_len,
                **self.model.info()}

    async def rerank(self, payload: Any) -> Any:
        raise InvalidRequest(f"Model `{self.name}` serves {self.model.task}; it does not rerank.")

    def batchers(self) -> tuple[Batcher[Any, Any], ...]:
        return (self.batcher,)


def make_app(worker: Worker | MediaWorker) -> FastAPI:
    app = FastAPI(title="hubserve worker", openapi_url=None, docs_url=None, redoc_url=None)
    started = time.time()

    async def answer(call: Any, request: Request) -> Response:
        try:
            payload = await request.json()
        except ValueError as e:
            return JSONResponse({"error": f"The request body is not valid JSON: {e}."}, status_code=400)
        try:
            result = await call(payload)
            if isinstance(result, media.Binary):
                return Response(result.data, media_type=result.content_type)
            return JSONResponse(result)
        except InvalidRequest as e:
            return JSONResponse({"error": e.message}, status_code=400)
        except Exception as e:
            log.exception("request failed")
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        batchers = worker.batchers()
        return worker.runner.info() | {"name": worker.name, "started": started,
                                       "batches": sum(b.batches for b in batchers),
                                       "items": sum(b.items for b in batchers)}

    @app.post("/run")
    async def run(request: Request) -> Response:
        return await answer(worker.run, request)

    @app.post("/rerank")
    async def rerank(request: Request) -> Response:
        return await answer(worker.rerank, request)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.engines.worker", description=__doc__)
    parser.add_argument("--uds", required=True, help="Unix socket to listen on")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision", required=True, help="the pinned commit")
    parser.add_argument("--task", required=True)
    parser.add_argument("--name", required=True, help="served name (for error messages)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    worker: Worker | MediaWorker
    if args.task in media.TASK_MODULES:
        device, dtype = select_device(args.device, args.dtype)
        spec = media.LoadSpec(args.repo, args.revision, args.task, device, dtype, args.trust_remote_code)
        worker = MediaWorker(media.load(spec), args.name, args.max_batch_size, args.batch_wait_ms / 1000, device)
    else:
        runner = Runner(args.repo, args.revision, args.task, args.device, args.trust_remote_code, args.dtype)
        device = runner.device
        worker = Worker(runner, args.name, args.max_batch_size, args.batch_wait_ms / 1000)
    log.info("loaded %s@%s for %s on %s in %.1f s", args.repo, args.revision[:12], args.task, device,
             time.monotonic() - started)
    config = uvicorn.Config(make_app(worker), uds=args.uds, log_level="warning", access_log=False)
    asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
