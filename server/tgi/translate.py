"""TGI ↔ vLLM translation, pure: a TGI generate request → a vLLM ``/v1/completions`` body, and vLLM's
answers (whole, or stream chunks) → TGI responses. No I/O here, so all of it is unit-tested.

vLLM is asked for ``return_token_ids`` and ``logprobs`` (0 = the sampled token only, N = top N) on every
request: TGI always reports each token's id and logprob. ``prompt_logprobs: 0`` gives TGI's prefill.
Every sampling knob is sent explicitly, because vLLM would otherwise apply the model's
generation_config.json defaults, while TGI decodes greedily unless asked to sample.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from server.tgi.protocol import (
    BestOfSequence,
    Details,
    FinishReason,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from server.tgi.tokens import TokenTexts

log = logging.getLogger("hubserve.tgi")

TOKEN_ID_PREFIX = "token_id:"  # vLLM's form of a token with return_tokens_as_token_ids


def completion_body(request: GenerateRequest, model: str, max_new_tokens: int, stream: bool) -> dict[str, Any]:
    """The vLLM /v1/completions body that does what the TGI request asks."""
    p = request.parameters
    body: dict[str, Any] = {
        "model": model,
        "prompt": request.inputs,
        "max_tokens": max_new_tokens,
        "n": p.best_of or 1,
        "stream": stream,
        "return_token_ids": True,
        "logprobs": p.top_n_tokens or 0,
        "stop": list(p.stop),
        "include_stop_str_in_output": True,  # TGI's generated_text ends with the stop sequence it met
        "repetition_penalty": p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        "frequency_penalty": p.frequency_penalty if p.frequency_penalty is not None else 0.0,
        "presence_penalty": 0.0,
        "min_p": 0.0,
    }
    if p.sampling:
        body["temperature"] = p.temperature if p.temperature is not None else 1.0
        body["top_p"] = p.top_p if p.top_p is not None else 1.0
        body["top_k"] = p.top_k if p.top_k is not None else 0
    else:  # greedy
        body |= {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    if p.seed is not None:
        body["seed"] = p.seed
    if p.top_n_tokens:
        body["return_tokens_as_token_ids"] = True  # top tokens keyed by id, not by (ambiguous) text
    if p.decoder_input_details and not stream:
        body["prompt_logprobs"] = 0
    if p.truncate is not None:
        body["truncate_prompt_tokens"] = p.truncate
        body["truncation_side"] = "left"  # TGI keeps the end of the input
    if p.grammar is not None:
        key = "regex" if p.grammar.type == "regex" else "json"
        body["structured_outputs"] = {key: p.grammar.value}
    if p.watermark:
        body["watermarking"] = True
    ignored = [name for name in ("typical_p",) if getattr(p, name) is not None]  # adapter_id: routed by serving
    if ignored:
        log.info("ignoring parameters vLLM does not support: %s", ", ".join(ignored))
    return body


def finish_reason(reason: str | None, stop_reason: object) -> FinishReason:
    """vLLM's finish_reason/stop_reason → TGI's: a matched stop string is stop_sequence; EOS or a stop token
    id is eos_token; everything else (length, abort) is length."""
    if reason == "stop":
        return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"
    return "length"


# ---- tokens ------------------------------------------------------------------------------------------------


def _token_id(text: str) -> int | None:
    if text.startswith(TOKEN_ID_PREFIX):
        try:
            return int(text[len(TOKEN_ID_PREFIX) :])
        except ValueError:
            return None
    return None


def _text(raw: str, token_id: int, vocab: TokenTexts) -> str:
    """A token's text: vLLM's, unless vLLM sent the ``token_id:N`` form (then the local tokenizer's)."""
    return vocab.decode(token_id) if raw.startswith(TOKEN_ID_PREFIX) else raw


def tokens_of(
    token_ids: list[int], logprobs: dict[str, Any] | None, vocab: TokenTexts, top_n: int
) -> tuple[list[Token], list[list[Token]] | None]:
    """Generated tokens (and top tokens when asked) from a vLLM choice's ``token_ids`` and ``logprobs``."""
    lp = logprobs or {}
    texts: list[str] = lp.get("tokens") or []
    values: list[float | None] = lp.get("token_logprobs") or []
    tops: list[dict[str, float] | None] = lp.get("top_logprobs") or []
    tokens: list[Token] = []
    top_tokens: list[list[Token]] | None = [] if top_n else None
    for i, tid in enumerate(token_ids):
        raw = texts[i] if i < len(texts) else ""
        logprob = values[i] if i < len(values) else None
        tokens.append(Token(id=tid, text=_text(raw, tid, vocab), logprob=logprob, special=vocab.is_special(tid)))
        if top_tokens is not None:
            top_tokens.append(_top(tops[i] if i < len(tops) else None, vocab, top_n))
    return tokens, top_tokens


def _top(entries: dict[str, float] | None, vocab: TokenTexts, top_n: int) -> list[Token]:
    out: list[Token] = []
    for raw, logprob in sorted((entries or {}).items(), key=lambda kv: -kv[1])[:top_n]:
        tid = _token_id(raw)
        if tid is None:
            continue
        out.append(Token(id=tid, text=vocab.decode(tid), logprob=logprob, special=vocab.is_special(tid)))
    return out


def prefill_of(choice: dict[str, Any], vocab: TokenTexts) -> list[PrefillToken]:
    """TGI's prefill from vLLM's ``prompt_token_ids`` and ``prompt_logprobs`` (first token: no logprob)."""
    ids: list[int] = choice.get("prompt_token_ids") or []
    logprobs: list[dict[str, Any] | None] = choice.get("prompt_logprobs") or []
    prefill = []
    for i, tid in enumerate(ids):
        entry = (logprobs[i] if i < len(logprobs) else None) or {}
        found = entry.get(str(tid)) or {}
        text = found.get("decoded_token")
        prefill.append(
            PrefillToken(id=tid, text=text if text is not None else vocab.decode(tid), logprob=found.get("logprob"))
        )
    return prefill


# ---- whole answers -----------------------------------------------------------------------------------------


def _sequence(choice: dict[str, Any], params: GenerateParameters, prefix: str, vocab: TokenTexts) -> BestOfSequence:
    tokens, top = tokens_of(choice.get("token_ids") or [], choice.get("logprobs"), vocab, params.top_n_tokens or 0)
    return BestOfSequence(
        generated_text=prefix + (choice.get("text") or ""),
        finish_reason=finish_reason(choice.get("finish_reason"), choice.get("stop_reason")),
        generated_tokens=len(tokens),
        seed=params.seed,
        prefill=prefill_of(choice, vocab) if params.decoder_input_details else [],
        tokens=tokens,
        top_tokens=top,
    )


def _score(seq: BestOfSequence) -> float:
    return sum(t.logprob or 0.0 for t in seq.tokens)


def generate_response(request: GenerateRequest, completion: dict[str, Any], vocab: TokenTexts) -> GenerateResponse:
    """vLLM's completion → TGI's GenerateResponse; with best_of, the most likely sequence wins."""
    params = request.parameters
    prefix = request.inputs if params.return_full_text else ""
    choices = completion.get("choices") or []
    if not choices:
        return GenerateResponse(generated_text=prefix)
    sequences = [_sequence(c, params, prefix, vocab) for c in choices]
    best = max(range(len(sequences)), key=lambda i: _score(sequences[i])) if len(sequences) > 1 else 0
    chosen = sequences[best]
    if not params.details:
        return GenerateResponse(generated_text=chosen.generated_text)
    others = [s for i, s in enumerate(sequences) if i != best]
    details = Details(
        **chosen.model_dump(exclude={"generated_text"}),
        best_of_sequences=others or None,
    )
    return GenerateResponse(generated_text=chosen.generated_text, details=details)


# ---- streams -----------------------------------------------------------------------------------------------


class StreamTranslator:
    """Turns vLLM completion stream chunks into TGI stream events, one per generated token.

    The event of the last token carries ``generated_text`` (and ``details`` when asked). vLLM sends the
    finish_reason with the last token; should it ever come in a chunk of its own, a closing event with an
    empty special token carries it (no text is duplicated).
    """

    def __init__(self, request: GenerateRequest, vocab: TokenTexts) -> None:
        self.params = request.parameters
        self.prefix = request.inputs if self.params.return_full_text else ""
        self.vocab = vocab
        self.index = 0
        self.generated = 0  # real tokens (the rare closing event without a token is not one)
        self.text: list[str] = []
        self.input_length = 0
        self.last_id = 0
        self.finished = False

    def feed(self, chunk: dict[str, Any]) -> Iterator[StreamResponse]:
        choices = chunk.get("choices") or []
        if not choices:
            return
        choice = choices[0]
        if choice.get("prompt_token_ids"):
            self.input_length = len(choice["prompt_token_ids"])
        ids: list[int] = choice.get("token_ids") or []
        tokens, tops = tokens_of(ids, choice.get("logprobs"), self.vocab, self.params.top_n_tokens or 0)
        if len(tokens) == 1 and tokens[0].text == "" and choice.get("text"):
            tokens[0].text = choice["text"]
        self.text.append(choice.get("text") or "")
        self.generated += len(tokens)
        reason = choice.get("finish_reason")
        for i, token in enumerate(tokens):
            last = reason is not None and i == len(tokens) - 1
            yield self._event(token, tops[i] if tops else None, reason if last else None, choice)
        if reason is not None and not tokens:
            token = Token(id=self.last_id, text="", logprob=0.0, special=True)
            yield self._event(token, [] if tops is not None else None, reason, choice)
        if tokens:
            self.last_id = tokens[-1].id

    def _event(
        self, token: Token, top: list[Token] | None, reason: str | None, choice: dict[str, Any]
    ) -> StreamResponse:
        self.index += 1
        event = StreamResponse(index=self.index, token=token, top_tokens=top)
        if reason is not None:
            self.finished = True
            event.generated_text = self.prefix + "".join(self.text)
            if self.params.details:
                event.details = StreamDetails(
                    finish_reason=finish_reason(reason, choice.get("stop_reason")),
                    generated_tokens=self.generated,
                    input_length=self.input_length,
                    seed=self.params.seed,
                )
        return event
