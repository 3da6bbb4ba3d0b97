"""The worker's audio tasks (engines/worker/audio.py) against transformers' pipelines run in-process.

Requests are the bodies InferenceClient sends (audio in base64), parsed by parse_media_task, then prepare + run as
the worker does; a batch mixes clip lengths, which must not change any answer.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
import transformers

from server.engines.worker import audio
from server.engines.worker.media import Binary, LoadSpec, MediaModel, decode_audio
from server.errors import InvalidRequest
from server.tasks.media_requests import parse_media_task
from tests.fixtures.audio_tasks import audio_classifier_dir, ctc_asr_dir, tone_wav, tts_dir
from tests.fixtures.whisper import tiny_whisper_dir

pytestmark = pytest.mark.integration

ASR = "automatic-speech-recognition"
CPU = torch.device("cpu")
WAVS = [tone_wav(440, 1.0, noise=0.2), tone_wav(1200, 0.5, noise=0.2, seed=1), tone_wav(700, 1.0, noise=0.3, seed=2)]
WHISPER_TOKENS = 6  # the tiny Whisper never stops on its own: keep it short


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load(folder: Any, task: str) -> MediaModel:
    return audio.load(LoadSpec(repo=str(folder), revision=None, task=task, device=CPU, dtype=torch.float32))  # type: ignore[arg-type]


def reference(folder: Any, task: str) -> Any:
    make: Any = transformers.pipeline  # its overloads want a literal task name
    return make(task, model=str(folder), device=CPU, dtype=torch.float32)


def answer(model: MediaModel, payloads: list[dict[str, Any]], fail: bool = True) -> list[Any]:
    """prepare every payload, then run them as one batch (they must share a key); raise an item's exception."""
    prepared = [model.prepare(parse_media_task(model.task, p, "m")) for p in payloads]
    keys = {key for _, key in prepared}
    assert len(keys) == 1
    outputs = model.run([item for item, _ in prepared], keys.pop())
    assert len(outputs) == len(payloads)
    for output in outputs:
        if fail and isinstance(output, BaseException):
            raise output
    return outputs


def clip(wav: bytes, sr: int = 16000) -> Any:
    return decode_audio(wav, sr)


def assert_transcript(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["text"] == want["text"]
    assert ("chunks" in got) == ("chunks" in want)
    for g, w in zip(got.get("chunks", []), want.get("chunks", []), strict=True):
        assert g["text"] == w["text"]
        assert [t is None for t in g["timestamp"]] == [t is None for t in w["timestamp"]]
        assert g["timestamp"] == pytest.approx([t for t in w["timestamp"]], abs=1e-6)


# ---- automatic-speech-recognition ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctc() -> tuple[MediaModel, Any]:
    return load(ctc_asr_dir(), ASR), reference(ctc_asr_dir(), ASR)


@pytest.fixture(scope="module")
def whisper() -> tuple[MediaModel, Any]:
    return load(tiny_whisper_dir(), ASR), reference(tiny_whisper_dir(), ASR)


@pytest.mark.parametrize("timestamps", [None, False, "char", "word", True])
def test_ctc_transcripts_match_the_pipeline(ctc: tuple[MediaModel, Any], timestamps: Any) -> None:
    model, pipe = ctc
    parameters = {} if timestamps is None else {"return_timestamps": timestamps}
    got = answer(model, [{"inputs": b64(wav), "parameters": parameters} for wav in WAVS])
    # The pipeline refuses True (and False) for CTC; the worker reads True as word timestamps.
    asked = {True: "word", False: None}.get(timestamps, timestamps)
    for wav, result in zip(WAVS, got, strict=True):
        want = pipe(clip(wav), **({"return_timestamps": asked} if asked else {}))
        assert_transcript(result, want)
    assert any(result["text"] for result in got)
    if timestamps:
        assert all(isinstance(c["timestamp"][1], float) for r in got for c in r["chunks"])
        if timestamps != "char":
            assert max(len(r["chunks"]) for r in got) > 1  # words split on the delimiter


def test_ctc_batch_equals_single(ctc: tuple[MediaModel, Any]) -> None:
    model, _ = ctc
    payloads = [{"inputs": b64(wav), "parameters": {"return_timestamps": "char"}} for wav in WAVS * 2]
    assert answer(model, payloads) == [answer(model, [p])[0] for p in payloads[:3]] * 2


@pytest.mark.parametrize("timestamps", [None, True])
def test_whisper_transcripts_match_the_pipeline(whisper: tuple[MediaModel, Any], timestamps: Any) -> None:
    model, pipe = whisper
    parameters: dict[str, Any] = {"max_new_tokens": WHISPER_TOKENS}
    if timestamps is not None:
        parameters["return_timestamps"] = timestamps
    wavs = WAVS[:2]  # 1 s and 0.5 s: one batch (Whisper pads both to its 30 s window)
    got = answer(model, [{"inputs": b64(wav), "parameters": parameters} for wav in wavs])
    for wav, result in zip(wavs, got, strict=True):  # the batch equals the pipeline's single-clip answers
        want = pipe(clip(wav), **parameters)
        assert_transcript(result, want)
        assert result["text"]
        assert ("chunks" in result) == bool(timestamps)  # segment chunks with True


def test_whisper_seeded_sampling(whisper: tuple[MediaModel, Any]) -> None:
    model, _ = whisper
    parameters: dict[str, Any] = {"max_new_tokens": WHISPER_TOKENS,
                                  "generation_parameters": {"do_sample": True, "temperature": 1.5, "seed": 5}}
    payloads = [{"inputs": b64(wav), "parameters": parameters} for wav in WAVS[:2]]
    first = answer(model, payloads)
    assert first == [answer(model, [p])[0] for p in payloads]  # seeded items run alone: same seed, same text


def test_whisper_language(whisper: tuple[MediaModel, Any]) -> None:
    model, pipe = whisper
    parameters = {"max_new_tokens": WHISPER_TOKENS, "generation_parameters": {"language": "fr", "task": "transcribe"}}
    (got,) = answer(model, [{"inputs": b64(WAVS[0]), "parameters": parameters}])
    assert_transcript(got, pipe(clip(WAVS[0]), max_new_tokens=WHISPER_TOKENS, language="fr", task="transcribe"))
    with pytest.raises(InvalidRequest):
        answer(model, [{"inputs": b64(WAVS[0]), "parameters": {"generation_parameters": {"language": "klingon"}}}])


def test_asr_refusals(ctc: tuple[MediaModel, Any], whisper: tuple[MediaModel, Any]) -> None:
    ctc_model, _ = ctc
    whisper_model, _ = whisper
    wav = b64(WAVS[0])

    def refused(model: MediaModel, parameters: dict[str, Any], param: str) -> None:
        with pytest.raises(InvalidRequest) as e:
            answer(model, [{"inputs": wav, "parameters": parameters}])
        assert e.value.param == param

    refused(whisper_model, {"return_timestamps": "char"}, "return_timestamps")
    refused(whisper_model, {"return_timestamps": "word"}, "return_timestamps")  # no alignment heads
    refused(whisper_model, {"generation_parameters": {"early_stopping": "sometimes"}}, "generation_parameters")
    refused(whisper_model, {"max_new_tokens": 1024}, "parameters")  # past the decoder's 448 positions
    refused(ctc_model, {"max_new_tokens": 5}, "generation_parameters")  # CTC does not generate


# ---- audio-classification -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier() -> tuple[MediaModel, Any]:
    folder = audio_classifier_dir()
    return load(folder, "audio-classification"), reference(folder, "audio-classification")


def test_tones_are_classified(classifier: tuple[MediaModel, Any]) -> None:
    model, _ = classifier
    high, low = answer(model, [{"inputs": b64(tone_wav(3000, 1.0))}, {"inputs": b64(tone_wav(300, 0.7))}])
    assert [x["label"] for x in high] == ["high", "low"]
    assert [x["label"] for x in low] == ["low", "high"]
    assert high[0]["score"] > 0.9 and low[0]["score"] > 0.9
    assert sum(x["score"] for x in high) == pytest.approx(1.0, abs=1e-5)  # softmax by default
    (resampled,) = answer(model, [{"inputs": b64(tone_wav(3000, 1.0, sr=8000))}])  # 8 kHz, read at 16 kHz
    assert resampled[0]["label"] == "high"


@pytest.mark.parametrize("parameters", [{}, {"top_k": 1}, {"top_k": 5}, {"function_to_apply": "sigmoid"},
                                        {"function_to_apply": "none", "top_k": 2}])
def test_classification_matches_the_pipeline(classifier: tuple[MediaModel, Any], parameters: dict[str, Any]) -> None:
    model, pipe = classifier
    wavs = [tone_wav(3000, 1.0, noise=0.05), tone_wav(250, 0.5), tone_wav(2500, 0.8, noise=0.1), WAVS[0]]
    got = answer(model, [{"inputs": b64(wav), "parameters": parameters} for wav in wavs])
    single = [answer(model, [{"inputs": b64(wav), "parameters": parameters}])[0] for wav in wavs]
    for wav, result, alone in zip(wavs, got, single, strict=True):
        want = pipe(clip(wav), **parameters)
        for other in (want, alone):
            assert [x["label"] for x in result] == [x["label"] for x in other]
            assert [x["score"] for x in result] == pytest.approx([x["score"] for x in other], abs=1e-3)
        assert set(result[0]) == {"label", "score"}


def test_bad_audio_is_invalid(classifier: tuple[MediaModel, Any], ctc: tuple[MediaModel, Any]) -> None:
    model, _ = classifier
    for inputs in (b64(b"not audio at all, just text"), "%%% not base64 %%%", b64(tone_wav(300, 0.005))):
        with pytest.raises(InvalidRequest) as e:
            answer(model, [{"inputs": inputs}])
        assert e.value.param == "inputs"
    with pytest.raises(InvalidRequest):  # 80 samples: under wav2vec2's 400-sample window
        answer(ctc[0], [{"inputs": b64(tone_wav(300, 0.005))}])
    # In a batch, a bad item fails alone: run answers its exception in its place (the batcher fails that request).
    good = b64(tone_wav(3000, 1.0))
    mixed = answer(model, [{"inputs": good}, {"inputs": b64(b"RIFF....WAVEfmt ")}, {"inputs": good}], fail=False)
    assert isinstance(mixed[1], InvalidRequest) and mixed[1].param == "inputs"
    (alone,) = answer(model, [{"inputs": good}])
    for result in (mixed[0], mixed[2]):
        assert [x["label"] for x in result] == [x["label"] for x in alone]
        assert [x["score"] for x in result] == pytest.approx([x["score"] for x in alone], abs=1e-5)


# ---- text-to-speech -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tts() -> tuple[MediaModel, Any]:
    return load(tts_dir(), "text-to-speech"), reference(tts_dir(), "text-to-speech")


def flac(result: Any) -> tuple[Any, int]:
    assert isinstance(result, Binary) and result.content_type == "audio/flac"
    samples, rate = soundfile.read(io.BytesIO(result.data), dtype="float32")
    assert soundfile.info(io.BytesIO(result.data)).format == "FLAC"
    return samples, rate


def test_speech_matches_the_pipeline(tts: tuple[MediaModel, Any]) -> None:
    model, pipe = tts
    texts = ["hello world", "a much longer sentence to say", "hi"]
    got = answer(model, [{"inputs": t, "parameters": {"seed": 7}} for t in texts])
    for text, result in zip(texts, got, strict=True):
        torch.manual_seed(7)
        want = pipe(text)
        samples, rate = flac(result)
        assert rate == want["sampling_rate"] == 16000
        expected = np.clip(want["audio"], -1.0, 1.0)
        assert samples.shape == expected.shape and samples.size > 0
        assert np.abs(samples - expected).max() <= 1.5 / 32768  # FLAC's 16-bit PCM
    assert [r.data for r in got] == [answer(model, [{"inputs": t, "parameters": {"seed": 7}}])[0].data for t in texts]


def test_speech_seed(tts: tuple[MediaModel, Any]) -> None:
    model, _ = tts
    seeded = {"inputs": "hello world", "parameters": {"seed": 1}}
    first, again = answer(model, [seeded, seeded])
    assert first.data == again.data == answer(model, [seeded])[0].data
    other = answer(model, [{"inputs": "hello world", "parameters": {"seed": 2}}])[0]
    assert other.data != first.data
    nested = answer(model, [{"inputs": "hello world", "parameters": {"generation_parameters": {"seed": 1}}}])[0]
    assert nested.data == first.data


def test_speech_refuses_generation_parameters_for_vits(tts: tuple[MediaModel, Any]) -> None:
    model, _ = tts
    with pytest.raises(InvalidRequest) as e:
        answer(model, [{"inputs": "hello", "parameters": {"max_new_tokens": 20}}])
    assert e.value.param == "generation_parameters"
    assert model.info() == {"sampling_rate": 16000}
