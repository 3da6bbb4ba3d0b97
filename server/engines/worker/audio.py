"""automatic-speech-recognition, audio-classification and text-to-speech / text-to-audio (engines/worker/media.py).

All three run transformers' pipelines. Audio is decoded here (``media.decode_audio``, libsndfile, at the feature
extractor's rate) and handed to the pipeline as numpy arrays: the pipelines' own decoding needs ffmpeg.

Batching must not change an answer, and the pipelines pad a batch to its longest clip, which does (CTC decodes the
padded frames, mean pooling averages them, group-norm feature encoders see them). So a batch is split into groups
of clips the feature extractor turns into features of one shape: one group when it pads or cuts every clip to a
fixed window (Whisper's 30 s, AST's frames), else one group per clip length. A seeded request runs alone (the
noise of a batch is not the noise of one clip); text-to-speech runs one text at a time for the same reasons.
An item that fails (audio that does not decode, parameters generate refuses) is answered its InvalidRequest in
place of an output, which fails that request alone (batcher.py).

Timestamps: CTC models give ``char`` or ``word`` chunks; ``return_timestamps=True`` (the only value the Hub's
spec has) means ``word`` for them (the pipeline refuses ``True`` for CTC). Whisper gives segments for ``True`` and
words for ``word`` (when its generation config has alignment heads).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Hashable
from typing import Any

from server.engines.worker.media import Binary, LoadSpec, MediaModel, decode_audio, encode_flac, load_pipeline
from server.errors import InvalidRequest
from server.tasks.media_requests import (
    AudioClassificationRequest,
    MediaRequest,
    SpeechRecognitionRequest,
    TextToSpeechRequest,
)

log = logging.getLogger("hubserve.worker")


def _receptive_field(config: Any) -> int:
    """The fewest samples a conv feature encoder (wav2vec2, HuBERT, WavLM, ...) reads; 1 for other models."""
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides:
        return 1
    field, jump = 1, 1
    for kernel, stride in zip(kernels, strides, strict=False):
        field += (kernel - 1) * jump
        jump *= stride
    return field


def _fixed_window(feature_extractor: Any, **call: Any) -> bool:
    """Whether the feature extractor gives clips of any length features of one shape (pads or cuts to a window)."""
    import numpy as np

    rate = feature_extractor.sampling_rate

    def shapes(n: int) -> list[tuple[int, ...]]:
        out = feature_extractor(np.zeros(n, dtype=np.float32), sampling_rate=rate, return_tensors="np", **call)
        return [tuple(value.shape) for value in out.values()]

    return shapes(rate // 2) == shapes(rate)


def _generation_key(kwargs: dict[str, Any], seed: int | None) -> str:
    return json.dumps({"kwargs": kwargs, "seed": seed}, sort_keys=True)


class _AudioPipeline(MediaModel):
    """A pipeline over decoded clips, batched by the shape of their features."""

    def __init__(self, spec: LoadSpec) -> None:
        import torch

        self.torch = torch
        self.task = spec.task
        self.pipe = load_pipeline(spec)
        self.sampling_rate = int(self.pipe.feature_extractor.sampling_rate)
        self.min_samples = _receptive_field(self.pipe.model.config)
        self.fixed = False  # set by subclasses: every clip (up to `window` samples) gets features of one shape
        self.window = 0

    def info(self) -> dict[str, Any]:
        return {"sampling_rate": self.sampling_rate}

    def _decode(self, items: list[str]) -> list[Any]:
        """Each item's samples, or the InvalidRequest that fails that item alone (the batcher answers it)."""
        clips: list[Any] = []
        for item in items:
            try:
                clip = decode_audio(item, self.sampling_rate)
            except InvalidRequest as e:
                clips.append(e)
                continue
            if clip.shape[0] < self.min_samples:
                ms = 1000 * self.min_samples / self.sampling_rate
                clip = InvalidRequest(f"`inputs` holds {clip.shape[0]} samples; this model reads at least "
                                      f"{self.min_samples} ({ms:.0f} ms at {self.sampling_rate} Hz).", param="inputs")
            clips.append(clip)
        return clips

    def _groups(self, clips: list[Any], alone: bool) -> list[list[int]]:
        """Indices of the decoded clips that batch without padding (each alone when ``alone``), in order."""
        groups: dict[Any, list[int]] = {}
        for i, clip in enumerate(clips):
            if isinstance(clip, BaseException):
                continue
            n = clip.shape[0]
            shape = i if alone else ("window" if self.fixed and (not self.window or n <= self.window) else n)
            groups.setdefault(shape, []).append(i)
        return list(groups.values())

    def _batched(self, clips: list[Any], call: Callable[[list[Any]], list[Any]], seed: int | None) -> list[Any]:
        answers: list[Any] = list(clips)  # the clips that did not decode keep their exception
        for group in self._groups(clips, alone=seed is not None):
            if seed is not None:
                self.torch.manual_seed(seed)
            for i, answer in zip(group, call([clips[i] for i in group]), strict=True):
                answers[i] = answer
        return answers


# ---- automatic-speech-recognition --------------------------------------------------------------------------


class SpeechRecognizer(_AudioPipeline):
    """CTC (wav2vec2 & co), Whisper and other seq2seq speech models through the ASR pipeline."""

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        pipe = self.pipe
        self.kind: str = pipe.type  # "ctc", "ctc_with_lm", "seq2seq_whisper", "seq2seq", "tdt"
        if pipe.tokenizer is not None and pipe.tokenizer.pad_token is None:
            # Batching needs a pad token (pad_collate_fn), though only the features are padded.
            pad = getattr(pipe.model.config, "pad_token_id", None)
            pad = pad if pad is not None else getattr(pipe.model.config, "eos_token_id", None)
            if isinstance(pad, int):
                pipe.tokenizer.pad_token = pipe.tokenizer.convert_ids_to_tokens(pad)
        self.fixed = _fixed_window(pipe.feature_extractor, return_attention_mask=True)
        # Whisper reads clips over its window as long-form audio, padded to the longest of a batch.
        self.window = int(getattr(pipe.feature_extractor, "n_samples", 0) or 0) if self.kind == "seq2seq_whisper" else 0
        generation = getattr(pipe, "generation_config", None)
        self.generation = generation if self.kind in ("seq2seq_whisper", "seq2seq") else None
        self.max_len = int(getattr(pipe.model.config, "max_target_positions", 0) or 0)

    def _timestamps(self, asked: bool | str | None) -> bool | str | None:
        if not asked:
            return None
        if self.kind in ("ctc", "ctc_with_lm"):
            if asked is True:
                return "word"
            if self.kind == "ctc_with_lm" and asked != "word":
                raise InvalidRequest("This CTC model decodes with a language model: only `return_timestamps` "
                                     "\"word\" (or true) is available.", param="return_timestamps")
            return asked
        if self.kind == "seq2seq_whisper":
            if asked == "char":
                raise InvalidRequest("Whisper gives segment (true) or \"word\" timestamps, not \"char\".",
                                     param="return_timestamps")
            if asked == "word" and getattr(self.generation, "alignment_heads", None) is None:
                raise InvalidRequest("This Whisper model's generation config has no `alignment_heads`: word "
                                     "timestamps are not available; send `return_timestamps: true` for segments.",
                                     param="return_timestamps")
            return asked
        if self.kind == "seq2seq":
            raise InvalidRequest("This speech model gives no timestamps (only CTC and Whisper models do).",
                                 param="return_timestamps")
        return asked

    def prepare(self, request: MediaRequest) -> tuple[str, Hashable]:
        assert isinstance(request, SpeechRecognitionRequest)
        timestamps = self._timestamps(request.parameters.return_timestamps)
        kwargs = request.parameters.generate()
        seed = kwargs.pop("seed", None)
        if kwargs or seed is not None:
            if self.generation is None:
                raise InvalidRequest(f"This model ({self.kind}) does not generate: generation parameters "
                                     f"({', '.join(sorted(kwargs) or ['seed'])}) do not apply.",
                                     param="generation_parameters")
            config = copy.deepcopy(self.generation)
            try:
                config.update(**kwargs)  # validates
                config.validate()
            except ValueError as e:
                raise InvalidRequest(f"Invalid generation parameters: {e}", param="generation_parameters") from e
        return request.inputs, (timestamps, _generation_key(kwargs, seed))

    def run(self, items: list[str], key: Hashable) -> list[Any]:
        assert isinstance(key, tuple)
        timestamps, generation = key
        options = json.loads(generation)
        kwargs: dict[str, Any] = dict(options["kwargs"])
        if timestamps:
            kwargs["return_timestamps"] = timestamps
        clips = self._decode(items)

        def call(batch: list[Any]) -> list[Any]:
            try:
                outputs = self.pipe(batch, batch_size=len(batch), **kwargs)
            except ValueError as e:  # generate refusing the request's parameters (for this group's clips)
                if not kwargs:
                    raise
                return [InvalidRequest(f"The model cannot honour these parameters: {e}", param="parameters")
                        for _ in batch]
            return [_transcript(out) for out in outputs]

        return self._batched(clips, call, options["seed"])


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


def _transcript(out: dict[str, Any]) -> dict[str, Any]:
    """The Hub's answer: ``text``, and ``chunks`` of {text, timestamp: [start, end]} when the pipeline gave them."""
    answer: dict[str, Any] = {"text": out["text"]}
    if "chunks" in out:
        answer["chunks"] = [{"text": c["text"], "timestamp": [_seconds(t) for t in c["timestamp"]]}
                            for c in out["chunks"]]
    return answer


# ---- audio-classification ----------------------------------------------------------------------------------


class AudioClassifier(_AudioPipeline):
    """[{label, score}], best first: the pipeline's defaults (every label, softmax) where the request sets none."""

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self.fixed = _fixed_window(self.pipe.feature_extractor)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "labels": self.pipe.model.config.num_labels}

    def prepare(self, request: MediaRequest) -> tuple[str, Hashable]:
        assert isinstance(request, AudioClassificationRequest)
        return request.inputs, (request.parameters.top_k, request.parameters.function_to_apply)

    def run(self, items: list[str], key: Hashable) -> list[Any]:
        assert isinstance(key, tuple)
        top_k, function = key
        kwargs = {k: v for k, v in (("top_k", top_k), ("function_to_apply", function)) if v is not None}
        clips = self._decode(items)

        def call(batch: list[Any]) -> list[Any]:
            outputs = self.pipe(batch, batch_size=len(batch), **kwargs)
            return [[{"label": s["label"], "score": float(s["score"])} for s in out] for out in outputs]

        return self._batched(clips, call, None)


# ---- text-to-speech / text-to-audio ------------------------------------------------------------------------


class SpeechSynthesizer(MediaModel):
    """FLAC bytes (``audio/flac``, the Inference API's answer) of the pipeline's waveform at its sampling rate.

    One text at a time: a batch pads its texts (and its audio) to the longest and draws other noise.
    """

    def __init__(self, spec: LoadSpec) -> None:
        import torch

        self.torch = torch
        self.task = spec.task
        self.pipe = load_pipeline(spec)
        self.generates = bool(self.pipe.model.can_generate())

    def info(self) -> dict[str, Any]:
        return {"sampling_rate": self.pipe.sampling_rate}

    def prepare(self, request: MediaRequest) -> tuple[str, Hashable]:
        assert isinstance(request, TextToSpeechRequest)
        kwargs = request.parameters.generate()
        seed = request.parameters.seed if request.parameters.seed is not None else kwargs.pop("seed", None)
        kwargs.pop("seed", None)
        if kwargs and not self.generates:
            raise InvalidRequest(f"This model ({type(self.pipe.model).__name__}) makes audio in one forward pass: "
                                 f"generation parameters ({', '.join(sorted(kwargs))}) do not apply.",
                                 param="generation_parameters")
        return request.inputs, _generation_key(kwargs, seed)

    def run(self, items: list[str], key: Hashable) -> list[Any]:
        assert isinstance(key, str)
        options = json.loads(key)
        kwargs = {"generate_kwargs": options["kwargs"]} if options["kwargs"] else {}
        answers: list[Any] = []
        for text in items:
            if options["seed"] is not None:
                self.torch.manual_seed(options["seed"])
            try:
                out = self.pipe(text, **kwargs)
            except ValueError as e:
                if not kwargs:
                    raise
                answers.append(InvalidRequest(f"The model cannot honour these parameters: {e}", param="parameters"))
                continue
            answers.append(Binary(encode_flac(out["audio"], out["sampling_rate"]), "audio/flac"))
        return answers


def load(spec: LoadSpec) -> MediaModel:
    if spec.task == "automatic-speech-recognition":
        return SpeechRecognizer(spec)
    if spec.task == "audio-classification":
        return AudioClassifier(spec)
    if spec.task in ("text-to-speech", "text-to-audio"):
        return SpeechSynthesizer(spec)
    raise ValueError(f"audio.py does not serve {spec.task}")
