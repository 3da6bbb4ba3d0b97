"""Every image, audio and table task of InferenceClient through one real ``hubserve serve``, each answer compared
with what transformers (or diffusers) computes in this process for the same model and input: labels, texts and
answers exactly, scores and boxes within 1e-3, masks and generated images equal (fixed seed).

The models are tiny ones built by the fixtures (tests/fixtures/vision_tasks.py, vision_language.py,
audio_tasks.py, table_models.py, diffusion_models.py); the image and the audio classifier are trained there in
seconds, so their answers mean something (a red image is "red", a 3 kHz tone "high"). The server is built as
users build theirs (a store, models.toml, ``hubserve serve``); each model runs in its own transformers worker
process. Whisper speech recognition on vLLM is checked on the session server (tests/e2e/conftest.py).
"""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import requests
import soundfile
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from sync.importer import import_folder
from sync.store import Store
from tests.e2e.conftest import READY_TIMEOUT_S, HubserveServer, running_server
from tests.fixtures import audio_tasks as at
from tests.fixtures import diffusion_models as dm
from tests.fixtures import table_models as tq
from tests.fixtures import vision_language as vl
from tests.fixtures import vision_tasks as vt

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
TOL = 1e-3

# served name → (repo, fixture builder, extra manifest lines)
MODELS: dict[str, tuple[str, Callable[[], Path], str]] = {
    "vit": ("hubserve-test/tiny-vit-colours", vt.image_classifier_dir, ""),
    "clip": ("hubserve-test/tiny-clip", vt.zero_shot_image_dir, ""),
    "yolos": ("hubserve-test/tiny-yolos", vt.object_detector_dir, ""),
    "segmenter": ("hubserve-test/tiny-segmenter", vt.segmenter_dir, ""),
    "captioner": ("hubserve-test/tiny-vit-gpt2", vl.captioner_dir, ""),
    "vilt": ("hubserve-test/tiny-vilt-vqa", vl.vqa_dir, ""),
    "layoutlm": ("hubserve-test/tiny-layoutlm-docqa", vl.document_qa_dir, ""),
    "ctc": ("hubserve-test/tiny-wav2vec2-ctc", at.ctc_asr_dir, ""),
    "tones": ("hubserve-test/tiny-wav2vec2-tones", at.audio_classifier_dir, ""),
    "vits": ("hubserve-test/tiny-vits", at.tts_dir, ""),
    "tapas": ("hubserve-test/tiny-tapas", tq.table_qa_dir, ""),
    "sd": ("hubserve-test/tiny-sd", dm.tiny_sd_dir, 'task = "text-to-image"'),
    "sd-img2img": ("hubserve-test/tiny-sd", dm.tiny_sd_dir, 'task = "image-to-image"'),
}


@pytest.fixture(scope="module")
def media_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubserveServer]:
    root = tmp_path_factory.mktemp("hubserve-media")
    store = Store(root / "store")
    commits: dict[str, str] = {}
    imported: dict[str, str] = {}
    entries = []
    for name, (repo, build, extra) in MODELS.items():
        imported[repo] = imported.get(repo) or import_folder(store, build(), repo).record.commit
        commits[name] = imported[repo]
        entries.append(f'[[models]]\nname = "{name}"\nrepo = "{repo}"\nrevision = "{commits[name]}"\n{extra}\n'
                       "[models.engine]\nbatch_wait_ms = 5\n")
    config = root / "models.toml"
    config.write_text('[store]\npath = "store"\n\n' + "\n".join(entries), encoding="utf-8")
    with running_server(config, store, commits, {n: m[0] for n, m in MODELS.items()}, READY_TIMEOUT_S) as server:
        yield server


def client(server: HubserveServer, name: str) -> InferenceClient:
    return InferenceClient(model=f"{server.url}/models/{name}", api_key=server.api_key, timeout=120)


def aclient(server: HubserveServer, name: str) -> AsyncInferenceClient:
    return AsyncInferenceClient(model=f"{server.url}/models/{name}", api_key=server.api_key, timeout=120)


def folder(name: str) -> str:
    return str(MODELS[name][1]())


@pytest.fixture(scope="module")
def pipelines() -> Callable[[str, str], Any]:
    from transformers import pipeline

    cache: dict[tuple[str, str], Any] = {}

    def get(task: str, name: str) -> Any:
        if (task, name) not in cache:
            cache[(task, name)] = pipeline(task, model=folder(name), device="cpu")
        return cache[(task, name)]

    return get


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def plain(items: Any) -> Any:
    """The client's dataclasses as plain dicts (they are dicts already)."""
    return [dict(i) for i in items] if isinstance(items, list) else dict(items)


def same(got: list[dict[str, Any]], want: list[dict[str, Any]], exact: tuple[str, ...]) -> None:
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want, strict=True):
        assert {k: g[k] for k in exact} == {k: w[k] for k in exact}, (g, w)
        assert abs(g["score"] - float(w["score"])) < TOL, (g, w)


# ---- image classification: the client, raw bytes, concurrency ------------------------------------------------


def test_image_classification_red_is_red_and_matches_transformers(media_server: HubserveServer,
                                                                  pipelines: Any) -> None:
    pipe = pipelines("image-classification", "vit")
    for colour in vt.COLOURS:
        image = vt.colour_image(colour, seed=7)
        got = plain(client(media_server, "vit").image_classification(png(image)))
        assert got[0]["label"] == colour and got[0]["score"] > 0.8
        same(got, pipe(image), ("label",))
    image = vt.colour_image("blue", seed=3)
    got = plain(client(media_server, "vit").image_classification(png(image), top_k=1, function_to_apply="none"))
    same(got, pipe(image, top_k=1, function_to_apply="none"), ("label",))


def test_raw_bytes_post_as_the_inference_api_docs_show(media_server: HubserveServer, pipelines: Any) -> None:
    image = vt.colour_image("green", seed=11)
    api_url = f"{media_server.url}/models/hubserve-test/tiny-vit-colours"
    r = requests.post(api_url, headers=media_server.headers, data=png(image), timeout=60)
    assert r.status_code == 200, r.text
    same(r.json(), pipelines("image-classification", "vit")(image), ("label",))


def test_concurrent_requests_are_batched_and_each_answer_is_its_own(media_server: HubserveServer,
                                                                    pipelines: Any) -> None:
    images = [vt.colour_image(c, seed=s) for s in range(4) for c in vt.COLOURS]
    hub = aclient(media_server, "vit")

    async def run() -> list[Any]:
        return list(await asyncio.gather(*(hub.image_classification(png(i)) for i in images)))

    answers = asyncio.run(run())
    pipe = pipelines("image-classification", "vit")
    for image, got in zip(images, answers, strict=True):
        same(plain(got), pipe(image), ("label",))


def test_zero_shot_image_classification(media_server: HubserveServer, pipelines: Any) -> None:
    image = vt.colour_image("red", seed=1)
    labels = ["a cat", "a dog", "a red square"]
    got = plain(client(media_server, "clip").zero_shot_image_classification(png(image), candidate_labels=labels))
    same(got, pipelines("zero-shot-image-classification", "clip")(image, candidate_labels=labels), ("label",))
    template = "a picture of {}"
    got = plain(client(media_server, "clip").zero_shot_image_classification(
        png(image), candidate_labels=labels, hypothesis_template=template))
    want = pipelines("zero-shot-image-classification", "clip")(image, candidate_labels=labels,
                                                                hypothesis_template=template)
    same(got, want, ("label",))


def test_object_detection(media_server: HubserveServer, pipelines: Any) -> None:
    image = vt.colour_image("red", size=(48, 40), seed=2)
    pipe = pipelines("object-detection", "yolos")
    for threshold in (None, 0.2):
        got = plain(client(media_server, "yolos").object_detection(png(image), threshold=threshold))
        want = pipe(image) if threshold is None else pipe(image, threshold=threshold)
        assert got, "the detector found nothing: the test would prove nothing"
        same(got, want, ("label",))
        assert [dict(g["box"]) for g in got] == [w["box"] for w in want]


def mask_array(mask: Any) -> Any:
    image = Image.open(io.BytesIO(base64.b64decode(mask))) if isinstance(mask, str) else mask
    return np.asarray(image)


def test_image_segmentation_masks_equal(media_server: HubserveServer, pipelines: Any) -> None:
    image = vt.colour_image("blue", size=(40, 32), seed=4)
    got = plain(client(media_server, "segmenter").image_segmentation(png(image)))
    want = pipelines("image-segmentation", "segmenter")(image)
    assert [g["label"] for g in got] == [w["label"] for w in want] and got
    for g, w in zip(got, want, strict=True):
        assert (g["score"] is None) == (w["score"] is None)
        assert np.array_equal(mask_array(g["mask"]), mask_array(w["mask"]))


# ---- image + text ----------------------------------------------------------------------------------------------


def caption_reference(image: Image.Image) -> str:
    """What transformers 4's image-to-text pipeline did: image processor, generate, decode."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(folder("captioner"), dtype=torch.float32).eval()
    pixels = AutoImageProcessor.from_pretrained(folder("captioner"))(images=image, return_tensors="pt").pixel_values
    with torch.inference_mode():
        ids = model.generate(pixels)[0]
    return str(AutoTokenizer.from_pretrained(folder("captioner")).decode(ids, skip_special_tokens=True))


def test_image_to_text(media_server: HubserveServer) -> None:
    image = vt.colour_image("green", seed=5)
    got = client(media_server, "captioner").image_to_text(png(image))
    assert got.generated_text == caption_reference(image) and got.generated_text


def vqa_reference(image: Image.Image, question: str, top_k: int) -> list[dict[str, Any]]:
    """What transformers 4's visual-question-answering pipeline did for ViLT: sigmoid over the answers, top k."""
    import torch
    from transformers import ViltForQuestionAnswering, ViltProcessor

    model = ViltForQuestionAnswering.from_pretrained(folder("vilt"), dtype=torch.float32).eval()
    inputs = ViltProcessor.from_pretrained(folder("vilt"))(image, question, return_tensors="pt")
    with torch.inference_mode():
        scores, ids = model(**inputs).logits.sigmoid()[0].topk(top_k)
    labels = model.config.id2label
    return [{"answer": labels[i], "score": s} for s, i in zip(scores.tolist(), ids.tolist(), strict=True)]


def test_visual_question_answering(media_server: HubserveServer) -> None:
    image = vt.colour_image("red", seed=6)
    got = plain(client(media_server, "vilt").visual_question_answering(png(image), "What colour is it?", top_k=3))
    same(got, vqa_reference(image, "What colour is it?", 3), ("answer",))


def test_document_question_answering_with_word_boxes(media_server: HubserveServer, pipelines: Any) -> None:
    image = Image.new("RGB", (200, 60), "white")
    words = [["Invoice", [10, 10, 80, 30]], ["total", [90, 10, 140, 30]], ["42", [150, 10, 180, 30]]]
    question = "What is the total?"
    got = plain(client(media_server, "layoutlm").document_question_answering(png(image), question,
                                                                              word_boxes=words))
    want = pipelines("document-question-answering", "layoutlm")(image=image, question=question, word_boxes=words)
    same(got, want if isinstance(want, list) else [want], ("answer", "start", "end"))


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract-ocr is not installed")
def test_document_question_answering_with_ocr(media_server: HubserveServer, pipelines: Any) -> None:
    from PIL import ImageDraw

    image = Image.new("RGB", (320, 80), "white")
    ImageDraw.Draw(image).text((10, 25), "INVOICE TOTAL 42 EURO", fill="black")
    image = image.resize((960, 240))
    question = "What is the total?"
    got = plain(client(media_server, "layoutlm").document_question_answering(png(image), question))
    want = pipelines("document-question-answering", "layoutlm")(image=image, question=question)
    same(got, want if isinstance(want, list) else [want], ("answer", "start", "end"))


# ---- audio -----------------------------------------------------------------------------------------------------


def test_speech_recognition_ctc_matches_transformers(media_server: HubserveServer, pipelines: Any) -> None:
    wav = at.tone_wav(440, 1.0)
    samples, _ = soundfile.read(io.BytesIO(wav), dtype="float32")
    want = pipelines("automatic-speech-recognition", "ctc")(samples.copy())
    assert client(media_server, "ctc").automatic_speech_recognition(wav).text == want["text"]
    r = requests.post(f"{media_server.url}/models/ctc", headers={**media_server.headers, "content-type": "audio/wav"},
                      data=wav, timeout=60)
    assert r.status_code == 200 and r.json() == {"text": want["text"]}
    got = client(media_server, "ctc").automatic_speech_recognition(wav, extra_body={"return_timestamps": "char"})
    want = pipelines("automatic-speech-recognition", "ctc")(samples.copy(), return_timestamps="char")
    assert got.text == want["text"]
    assert [(c.text, list(c.timestamp)) for c in got.chunks or []] == [
        (c["text"], list(c["timestamp"])) for c in want["chunks"]]


def test_speech_recognition_whisper_on_vllm_is_a_hub_task(hubserve_server: HubserveServer) -> None:
    from tests.e2e.test_api_families import tone_wav, whisper_reference

    wav = tone_wav()
    hub = InferenceClient(model=f"{hubserve_server.url}/models/whisper", api_key=hubserve_server.api_key)
    cap = {"generation_parameters": {"max_new_tokens": 8, "language": "en"}}  # it never ends on its own
    got = hub.automatic_speech_recognition(wav, extra_body=cap)
    assert got.text == whisper_reference(wav, "transcribe") and got.text
    r = httpx.post(f"{hubserve_server.url}/models/whisper", content=wav, headers=hubserve_server.headers, timeout=60)
    assert r.status_code == 200 and isinstance(r.json()["text"], str)


def test_audio_classification_high_is_high(media_server: HubserveServer, pipelines: Any) -> None:
    pipe = pipelines("audio-classification", "tones")
    for freq, label in ((3000, "high"), (300, "low")):
        wav = at.tone_wav(freq, 0.8)
        samples, _ = soundfile.read(io.BytesIO(wav), dtype="float32")
        got = plain(client(media_server, "tones").audio_classification(wav))
        assert got[0]["label"] == label
        same(got, pipe(samples.copy()), ("label",))
        got = plain(client(media_server, "tones").audio_classification(wav, top_k=1, function_to_apply="sigmoid"))
        same(got, pipe(samples.copy(), top_k=1, function_to_apply="sigmoid"), ("label",))


def test_text_to_speech_is_flac_equal_to_transformers(media_server: HubserveServer, pipelines: Any) -> None:
    import torch

    audio = client(media_server, "vits").text_to_speech("hello there", extra_body={"seed": 3})
    samples, rate = soundfile.read(io.BytesIO(audio), dtype="float32")
    assert audio[:4] == b"fLaC"
    pipe = pipelines("text-to-audio", "vits")
    torch.manual_seed(3)
    want = pipe("hello there")
    reference = np.asarray(want["audio"], dtype=np.float32).reshape(-1)
    assert rate == want["sampling_rate"] and samples.shape == reference.shape
    assert np.max(np.abs(samples - np.clip(reference, -1, 1))) < 2 / 32768  # FLAC stores 16-bit samples
    again = client(media_server, "vits").text_to_speech("hello there", extra_body={"seed": 3})
    assert again == audio


# ---- tables ----------------------------------------------------------------------------------------------------


def test_table_question_answering(media_server: HubserveServer, pipelines: Any) -> None:
    import pandas as pd

    table = {"city": ["Paris", "Lyon", "Nice"], "people": ["2100000", "520000", "340000"]}
    query = "How many people live in Lyon?"
    got = dict(client(media_server, "tapas").table_question_answering(table, query))
    want = pipelines("table-question-answering", "tapas")(table=pd.DataFrame(table), query=query)
    want["coordinates"] = [list(c) for c in want["coordinates"]]  # JSON has no tuples
    assert got["cells"], "no cell selected: the test would prove little"
    assert {k: got[k] for k in ("answer", "coordinates", "cells", "aggregator")} == {
        k: want[k] for k in ("answer", "coordinates", "cells", "aggregator")}


# ---- images out (diffusers) ------------------------------------------------------------------------------------


def diffusers_reference(task: str, prompt: str, seed: int, **kwargs: Any) -> Image.Image:
    import torch
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    cls = AutoPipelineForText2Image if task == "text-to-image" else AutoPipelineForImage2Image
    pipe = cls.from_pretrained(folder("sd"), torch_dtype=torch.float32, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    image: Image.Image = pipe(prompt, generator=generator, **kwargs).images[0]
    return image


def test_text_to_image_equals_diffusers(media_server: HubserveServer) -> None:
    hub = client(media_server, "sd")
    args = {"num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32}
    got = hub.text_to_image("a red square", seed=5, negative_prompt="blue", **args)
    want = diffusers_reference("text-to-image", "a red square", 5, negative_prompt="blue", **args)
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.convert("RGB")))
    other = hub.text_to_image("a red square", seed=6, negative_prompt="blue", **args)
    assert not np.array_equal(np.asarray(other), np.asarray(got))


def test_image_to_image_equals_diffusers(media_server: HubserveServer) -> None:
    source = vt.colour_image("red", size=(32, 32), seed=9)
    got = client(media_server, "sd-img2img").image_to_image(png(source), prompt="a blue square",
                                                            num_inference_steps=4, guidance_scale=2.0,
                                                            seed=2, strength=0.5)  # **kwargs: parameters
    want = diffusers_reference("image-to-image", "a blue square", 2, image=source, num_inference_steps=4,
                               guidance_scale=2.0, strength=0.5)
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.convert("RGB")))


# ---- what is refused -------------------------------------------------------------------------------------------


def test_refusals_in_the_hub_shape(media_server: HubserveServer) -> None:
    with pytest.raises(HfHubHTTPError, match="tabular-classification and tabular-regression are not served"):
        client(media_server, "vit").tabular_classification({"a": ["1", "2"]})
    r = httpx.post(f"{media_server.url}/models/vit", json={"inputs": "https://example.com/cat.png"},
                   headers=media_server.headers)
    assert r.status_code == 400 and "offline" in r.json()["error"]
    r = httpx.post(f"{media_server.url}/models/tones", content=b"RIFF not really a wave file",
                   headers=media_server.headers)
    assert r.status_code == 400 and "not audio" in r.json()["error"]
    body = {"inputs": base64.b64encode(png(vt.colour_image("red"))).decode(), "parameters": {"candidate_labels": []}}
    r = httpx.post(f"{media_server.url}/models/clip", json=body, headers=media_server.headers)
    assert r.status_code == 400 and "candidate_labels" in r.json()["error"]


def test_models_list_what_each_takes_in(media_server: HubserveServer) -> None:
    data = httpx.get(f"{media_server.url}/v1/models", headers=media_server.headers).json()["data"]
    listed = {m["id"]: m for m in data}
    assert listed["vit"]["input_modalities"] == ["image"] and listed["ctc"]["input_modalities"] == ["audio"]
    assert listed["vilt"]["input_modalities"] == ["image", "text"] and listed["vits"]["input_modalities"] == ["text"]
    health = httpx.get(f"{media_server.url}/health").json()
    assert {m["backend"] for m in health["models"].values()} == {"transformers"}, health
