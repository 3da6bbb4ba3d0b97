"""text-to-image and image-to-image in the worker (server/engines/worker/diffusion.py) against diffusers in-process.

The reference is the same tiny Stable Diffusion folder loaded a second time with diffusers' own pipeline classes,
run with a CPU generator seeded like the request; answers must decode (as InferenceClient does, with PIL) to the
very same pixels. Few steps, 32x32 images and one torch thread keep each call well under a second.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from server.engines.worker.media import Binary, LoadSpec
from server.errors import InvalidRequest
from server.tasks.media_requests import parse_media_task
from tests.fixtures.diffusion_models import tiny_sd_dir
from tests.fixtures.tiny import torch_threads

pytestmark = pytest.mark.integration

STEPS = 2
SIZE = {"height": 32, "width": 32}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):  # tiny models: one torch thread is faster, more so on a busy machine
        yield


@pytest.fixture(scope="module")
def sd_dir() -> Any:
    return tiny_sd_dir()


@pytest.fixture(scope="module")
def text2image(sd_dir: Any) -> Any:
    import torch

    from server.engines.worker.diffusion import load

    return load(LoadSpec(str(sd_dir), "0" * 40, "text-to-image", torch.device("cpu"), torch.float32))


@pytest.fixture(scope="module")
def image2image(sd_dir: Any) -> Any:
    import torch

    from server.engines.worker.diffusion import load

    return load(LoadSpec(str(sd_dir), "0" * 40, "image-to-image", torch.device("cpu"), torch.float32))


@pytest.fixture(scope="module")
def references(sd_dir: Any) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    pipes = {"text-to-image": StableDiffusionPipeline.from_pretrained(sd_dir, dtype=torch.float32),
             "image-to-image": StableDiffusionImg2ImgPipeline.from_pretrained(sd_dir, dtype=torch.float32)}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def _image(width: int, height: int, seed: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    noise = rng.integers(0, 64, (height, width, 3))
    return Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8))


def _b64(image: Any) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


INPUT = _image(32, 32, 0)
WIDE = _image(40, 48, 1)  # 40 wide, 48 high


def _pixels(answer: Any) -> np.ndarray:
    """The answer as InferenceClient reads it (``Image.open`` on the bytes)."""
    from PIL import Image

    assert isinstance(answer, Binary) and answer.content_type == "image/png"
    return np.asarray(Image.open(io.BytesIO(answer.data)).convert("RGB"))


def _prepare(model: Any, payload: dict[str, Any]) -> tuple[Any, Any]:
    return model.prepare(parse_media_task(model.task, payload, "m"))


def _ask(model: Any, payload: dict[str, Any]) -> np.ndarray:
    item, key = _prepare(model, payload)
    (answer,) = model.run([item], key)
    return _pixels(answer)


def _reference(pipe: Any, scheduler: str | None = None, seed: int = 3, **kwargs: Any) -> np.ndarray:
    import diffusers
    import torch

    default = pipe.scheduler
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(default.config)
    try:
        image = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    finally:
        pipe.scheduler = default
    return np.asarray(image)


T2I_CASES = [
    pytest.param({**SIZE}, {**SIZE}, id="32x32"),
    pytest.param({}, {}, id="default-size"),  # 32 (the UNet's sample size) x 2 (the VAE's scale factor) = 64
    pytest.param({"height": 48, "width": 32}, {"height": 48, "width": 32}, id="48x32"),
    pytest.param({**SIZE, "negative_prompt": "a dark blurry photo", "guidance_scale": 3.0},
                 {**SIZE, "negative_prompt": "a dark blurry photo", "guidance_scale": 3.0}, id="negative-guidance"),
    pytest.param({**SIZE, "guidance_scale": 1.0}, {**SIZE, "guidance_scale": 1.0}, id="no-cfg"),
    pytest.param({**SIZE, "scheduler": "EulerAncestralDiscreteScheduler"},
                 {**SIZE, "scheduler": "EulerAncestralDiscreteScheduler"}, id="euler-ancestral"),
    pytest.param({**SIZE, "scheduler": "PNDMScheduler"}, {**SIZE}, id="own-scheduler"),
]


@pytest.mark.parametrize(("params", "expected"), T2I_CASES)
def test_text_to_image_equals_the_pipeline(text2image: Any, references: dict[str, Any], params: dict[str, Any],
                                           expected: dict[str, Any]) -> None:
    payload = {"inputs": "a cat on a mat", "parameters": {**params, "num_inference_steps": STEPS, "seed": 3}}
    got = _ask(text2image, payload)
    want = _reference(references["text-to-image"], prompt="a cat on a mat", num_inference_steps=STEPS, **expected)
    assert got.shape == (params.get("height", 64), params.get("width", 64), 3)
    assert np.array_equal(got, want)


def test_text_to_image_parameters_change_the_image(text2image: Any) -> None:
    base = {**SIZE, "num_inference_steps": STEPS, "seed": 3}
    plain = _ask(text2image, {"inputs": "a cat", "parameters": base})
    for change in ({"negative_prompt": "a dog"}, {"guidance_scale": 1.0}, {"scheduler": "DDIMScheduler"},
                   {"num_inference_steps": 3}):
        assert not np.array_equal(_ask(text2image, {"inputs": "a cat", "parameters": {**base, **change}}), plain)
    assert not np.array_equal(_ask(text2image, {"inputs": "a dog", "parameters": base}), plain)


def test_unknown_parameters_are_ignored(text2image: Any) -> None:
    params = {**SIZE, "num_inference_steps": STEPS, "seed": 3}
    plain = _ask(text2image, {"inputs": "a cat", "parameters": params})
    extra = _ask(text2image, {"inputs": "a cat", "parameters": {**params, "strength": 0.5, "eta": 1.0}})
    assert np.array_equal(extra, plain)


def test_text_to_image_seeds(text2image: Any) -> None:
    def ask(**seed: int) -> np.ndarray:
        return _ask(text2image, {"inputs": "a cat", "parameters": {**SIZE, "num_inference_steps": STEPS, **seed}})

    assert np.array_equal(ask(seed=11), ask(seed=11))
    assert not np.array_equal(ask(seed=11), ask(seed=12))
    assert not np.array_equal(ask(), ask())  # no seed: a random one each time


I2I_CASES = [
    pytest.param({"prompt": "a dog", "strength": 0.5, "num_inference_steps": 4},
                 {"prompt": "a dog", "strength": 0.5, "num_inference_steps": 4}, id="strength"),
    pytest.param({"prompt": "a dog", "num_inference_steps": STEPS},
                 {"prompt": "a dog", "num_inference_steps": STEPS}, id="default-strength"),
    pytest.param({"num_inference_steps": STEPS, "strength": 1.0},
                 {"prompt": "", "num_inference_steps": STEPS, "strength": 1.0}, id="no-prompt"),
    pytest.param({"prompt": "a dog", "num_inference_steps": STEPS, "negative_prompt": "a cat", "guidance_scale": 2.0},
                 {"prompt": "a dog", "num_inference_steps": STEPS, "negative_prompt": "a cat", "guidance_scale": 2.0},
                 id="negative-guidance"),
    pytest.param({"prompt": "a dog", "num_inference_steps": STEPS, "scheduler": "DDIMScheduler"},
                 {"prompt": "a dog", "num_inference_steps": STEPS, "scheduler": "DDIMScheduler"}, id="ddim"),
]


@pytest.mark.parametrize(("params", "expected"), I2I_CASES)
def test_image_to_image_equals_the_pipeline(image2image: Any, references: dict[str, Any], params: dict[str, Any],
                                            expected: dict[str, Any]) -> None:
    got = _ask(image2image, {"inputs": _b64(INPUT), "parameters": {**params, "seed": 5}})
    want = _reference(references["image-to-image"], seed=5, image=INPUT, **expected)
    assert got.shape == (32, 32, 3)
    assert np.array_equal(got, want)


def test_image_to_image_target_size_resizes_the_input(image2image: Any, references: dict[str, Any]) -> None:
    from PIL import Image

    params = {"prompt": "a dog", "num_inference_steps": STEPS, "seed": 5, "target_size": {"height": 32, "width": 24}}
    got = _ask(image2image, {"inputs": _b64(WIDE), "parameters": params})
    resized = WIDE.resize((24, 32), Image.Resampling.LANCZOS)
    want = _reference(references["image-to-image"], seed=5, image=resized, prompt="a dog", num_inference_steps=STEPS)
    assert got.shape == (32, 24, 3)
    assert np.array_equal(got, want)


def test_image_to_image_seeds_and_prompts(image2image: Any) -> None:
    def ask(prompt: str, seed: int) -> np.ndarray:
        params = {"prompt": prompt, "num_inference_steps": STEPS, "seed": seed}
        return _ask(image2image, {"inputs": _b64(INPUT), "parameters": params})

    assert np.array_equal(ask("a dog", 1), ask("a dog", 1))
    assert not np.array_equal(ask("a dog", 1), ask("a dog", 2))
    assert not np.array_equal(ask("a dog", 1), ask("a cat", 1))


def _batch(model: Any, payloads: list[dict[str, Any]]) -> tuple[list[Any], Any]:
    prepared = [_prepare(model, payload) for payload in payloads]
    keys = {key for _, key in prepared}
    assert len(keys) == 1, "the requests differ only in prompt, negative prompt text and seed: one batch key"
    return [item for item, _ in prepared], keys.pop()


T2I_BATCH = [{"inputs": prompt, "parameters": {**SIZE, "num_inference_steps": STEPS, "seed": seed,
                                                "negative_prompt": negative}}
             for prompt, seed, negative in [("a cat", 1, "blurry"), ("a dog", 1, ""),
                                            ("the quick brown fox", 5, "dark"), ("a cat", 7, "blurry")]]
I2I_BATCH = [{"inputs": _b64(image), "parameters": {"prompt": prompt, "num_inference_steps": STEPS, "seed": seed}}
             for image, prompt, seed in [(INPUT, "a dog", 1), (WIDE, "a dog", 1), (INPUT, "a cat", 4),
                                         (WIDE, "a fox", 2)]]


@pytest.mark.parametrize("task", ["text-to-image", "image-to-image"])
def test_a_batch_answers_what_single_requests_answer(text2image: Any, image2image: Any, task: str) -> None:
    model, payloads = (text2image, T2I_BATCH) if task == "text-to-image" else (image2image, I2I_BATCH)
    items, key = _batch(model, payloads)
    singles = [_pixels(model.run([item], key)[0]) for item in items]
    batched = [_pixels(answer) for answer in model.run(items, key)]
    assert all(np.array_equal(a, b) for a, b in zip(batched, singles, strict=True))
    assert len({s.tobytes() for s in singles}) == len(singles)


@pytest.fixture
def batched_models(text2image: Any, image2image: Any) -> Iterator[dict[str, Any]]:
    """The models as on an accelerator: one pipeline call per batch."""
    for model in (text2image, image2image):
        model.batched = True
    yield {"text-to-image": text2image, "image-to-image": image2image}
    for model in (text2image, image2image):
        model.batched = False


@pytest.mark.parametrize("task", ["text-to-image", "image-to-image"])
def test_one_pipeline_call_per_batch_keeps_each_request_its_own(batched_models: dict[str, Any], task: str) -> None:
    """Prompts, negative prompts, seeds and images stay with their request in one batched call; pixels may move
    by a level (another summation order: the reason CPU batches run item by item)."""
    model = batched_models[task]
    items, key = _batch(model, T2I_BATCH if task == "text-to-image" else I2I_BATCH)
    batched = [_pixels(answer) for answer in model.run(items, key)]
    singles = [_pixels(model.run([item], key)[0]) for item in items]
    for i, got in enumerate(batched):
        assert got.shape == singles[i].shape
        own = np.abs(got.astype(int) - singles[i])
        assert own.max() <= 2 and own.mean() < 0.05
        # The tiny text encoder moves the image little: same seed, other prompt differs by ~2 levels on average.
        assert all(np.abs(got.astype(int) - other).mean() > 1 for other in singles[:i] + singles[i + 1:]
                   if other.shape == got.shape)


@pytest.mark.parametrize(("name", "why"), [("NotAScheduler", "not a diffusers scheduler"),
                                           ("AutoencoderKL", "not a diffusers scheduler"),
                                           ("FlowMatchEulerDiscreteScheduler", "not compatible")])
def test_a_bad_scheduler_is_refused(text2image: Any, name: str, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why) as caught:
        _prepare(text2image, {"inputs": "a cat", "parameters": {"scheduler": name}})
    assert caught.value.param == "scheduler"


def test_bad_image_to_image_requests_are_refused(image2image: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:  # SD image-to-image has no height/width: target_size
        _prepare(image2image, {"inputs": _b64(INPUT), "parameters": {"height": 32}})
    assert caught.value.param == "height"
    with pytest.raises(InvalidRequest) as caught:
        _prepare(image2image, {"inputs": _b64(INPUT), "parameters": {"num_inference_steps": 2, "strength": 0.2}})
    assert caught.value.param == "strength"
    item, key = _prepare(image2image, {"inputs": base64.b64encode(b"not an image").decode(), "parameters": {}})
    with pytest.raises(InvalidRequest, match="not an image"):
        image2image.run([item], key)


def test_info(text2image: Any, image2image: Any) -> None:
    info = text2image.info()
    assert (info["pipeline"], info["scheduler"]) == ("StableDiffusionPipeline", "PNDMScheduler")
    assert (info["default_height"], info["default_width"]) == (64, 64)
    assert "EulerDiscreteScheduler" in info["schedulers"]
    assert image2image.info()["pipeline"] == "StableDiffusionImg2ImgPipeline"
    assert text2image.max_len == 77
