"""The worker's image tasks (server/engines/worker/vision.py) on tiny real models, against transformers' pipelines.

Requests go through ``parse_media_task`` with the bodies ``InferenceClient`` sends (base64 PNG), then the model's
``prepare`` and ``run``, as the worker does; each answer is compared with the pipeline run in-process on the same
model folder and image, one image at a time. Batches of several images (different sizes) answer as single runs do.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.engines.worker.media import LoadSpec, MediaModel
from server.engines.worker.vision import load
from server.errors import InvalidRequest
from server.tasks.media_requests import parse_media_task
from tests.fixtures import vision_tasks as vt
from tests.fixtures.tiny import torch_threads

pytestmark = pytest.mark.integration

IMAGES = [vt.colour_image("red", seed=1), vt.colour_image("blue", size=(48, 40), seed=2),
          vt.colour_image("green", size=(20, 30), seed=3), vt.colour_image("red", size=(48, 40), seed=4)]
Loaded = tuple[MediaModel, Any]  # (our model, the reference pipeline)


def b64png(image: Any) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def _loaded(task: str, build: Callable[[], Path]) -> Loaded:
    import torch
    import transformers

    folder = str(build())
    model = load(LoadSpec(repo=folder, revision="main", task=task, device=torch.device("cpu"), dtype=torch.float32))
    pipeline: Any = transformers.pipeline
    return model, pipeline(task, model=folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):  # tiny models: one torch thread is faster, more so on a busy machine
        yield


@pytest.fixture(scope="module")
def classifier() -> Loaded:
    return _loaded("image-classification", vt.image_classifier_dir)


@pytest.fixture(scope="module")
def clip() -> Loaded:
    return _loaded("zero-shot-image-classification", vt.zero_shot_image_dir)


@pytest.fixture(scope="module")
def detector() -> Loaded:
    return _loaded("object-detection", vt.object_detector_dir)


@pytest.fixture(scope="module")
def segmenter() -> Loaded:
    return _loaded("image-segmentation", vt.segmenter_dir)


@pytest.fixture(scope="module")
def mask_segmenter() -> Loaded:
    return _loaded("image-segmentation", vt.mask_segmenter_dir)


def ask(model: MediaModel, images: list[Any], parameters: dict[str, Any] | None = None) -> list[Any]:
    """One batch of requests with the same parameters, as the batcher would run it."""
    prepared = []
    for image in images:
        payload: dict[str, Any] = {"inputs": image if isinstance(image, str) else b64png(image)}
        if parameters is not None:
            payload["parameters"] = parameters
        prepared.append(model.prepare(parse_media_task(model.task, payload, "m")))
    keys = {key for _, key in prepared}
    assert len(keys) == 1
    return model.run([item for item, _ in prepared], keys.pop())


def mask_array(mask: Any) -> Any:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(mask))) if isinstance(mask, str) else mask)


def same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Labels, boxes and masks exact, scores within 1e-3, as the InferenceClient would read them."""
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        assert (g["score"] is None) == (w["score"] is None)
        if w["score"] is not None:
            assert isinstance(g["score"], float) and abs(g["score"] - w["score"]) < 1e-3
        if "box" in w:
            assert g["box"] == w["box"] and all(type(v) is int for v in g["box"].values())
        if "mask" in w:
            assert isinstance(g["mask"], str) and np.array_equal(mask_array(g["mask"]), mask_array(w["mask"]))


def same_as_single(model: MediaModel, parameters: dict[str, Any] | None = None) -> list[Any]:
    batch = ask(model, IMAGES, parameters)
    for image, got in zip(IMAGES, batch, strict=True):
        same(got, ask(model, [image], parameters)[0])
    return batch


# ---- image classification ----------------------------------------------------------------------------------


def test_a_red_image_is_red(classifier: Loaded) -> None:
    model, _ = classifier
    for colour in vt.COLOURS:
        (answer,) = ask(model, [vt.colour_image(colour, seed=42)])
        assert answer[0]["label"] == colour and answer[0]["score"] > 0.9
        assert [set(a) for a in answer] == [{"label", "score"}] * len(vt.COLOURS)


@pytest.mark.parametrize("parameters", [None, {"top_k": 1}, {"top_k": 2, "function_to_apply": "sigmoid"},
                                        {"function_to_apply": "none"}, {"top_k": 50}])
def test_classification_matches_the_pipeline(classifier: Loaded, parameters: dict[str, Any] | None) -> None:
    model, pipe = classifier
    batch = same_as_single(model, parameters)
    for image, got in zip(IMAGES, batch, strict=True):
        same(got, pipe(image, **(parameters or {})))


# ---- zero-shot image classification -------------------------------------------------------------------------


@pytest.mark.parametrize("parameters", [{"candidate_labels": ["a cat", "a dog", "a red square"]},
                                        {"candidate_labels": "cat, dog,red", "hypothesis_template": "a {} here"},
                                        {"candidate_labels": ["only"]}])
def test_zero_shot_matches_the_pipeline(clip: Loaded, parameters: dict[str, Any]) -> None:
    model, pipe = clip
    batch = same_as_single(model, parameters)
    given = parameters["candidate_labels"]
    labels = [s.strip() for s in given.split(",")] if isinstance(given, str) else given
    extra = {k: v for k, v in parameters.items() if k != "candidate_labels"}
    for image, got in zip(IMAGES, batch, strict=True):
        same(got, pipe(image, candidate_labels=labels, **extra))  # the default template is the pipeline's own


def test_zero_shot_bad_labels(clip: Loaded) -> None:
    model, _ = clip
    empty: tuple[Any, ...] = ([], "", " , ")  # the request model refuses them before the model sees them
    for labels in empty:
        with pytest.raises(InvalidRequest, match="candidate_labels"):
            ask(model, [IMAGES[0]], {"candidate_labels": labels})
    with pytest.raises(InvalidRequest, match="hypothesis_template"):
        ask(model, [IMAGES[0]], {"candidate_labels": ["x"], "hypothesis_template": "no placeholder"})
    with pytest.raises(InvalidRequest, match="braces") as e:
        ask(model, [IMAGES[0]], {"candidate_labels": ["x"], "hypothesis_template": "{} of {kind}"})
    assert e.value.param == "hypothesis_template"
    with pytest.raises(InvalidRequest, match="longer than") as e:  # more tokens than CLIP's text positions
        ask(model, [IMAGES[0]], {"candidate_labels": ["ok", "a very long label " * 10]})
    assert e.value.param == "candidate_labels"


# ---- object detection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameters", [None, {"threshold": 0.0}, {"threshold": 0.8}, {"threshold": 1.0}])
def test_detection_matches_the_pipeline(detector: Loaded, parameters: dict[str, Any] | None) -> None:
    model, pipe = detector
    batch = same_as_single(model, parameters)
    for image, got in zip(IMAGES, batch, strict=True):
        same(got, pipe(image, **(parameters or {})))
    if parameters is None:
        assert all(batch), "nothing passes the default threshold: the fixture proves nothing"
        assert {tuple(sorted(a["box"])) for a in batch[0]} == {("xmax", "xmin", "ymax", "ymin")}


# ---- image segmentation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameters", [None, {"subtask": "semantic"}])
def test_semantic_segmentation_matches_the_pipeline(segmenter: Loaded, parameters: dict[str, Any] | None) -> None:
    model, pipe = segmenter
    batch = same_as_single(model, parameters)
    for image, got in zip(IMAGES, batch, strict=True):
        want = pipe(image, **(parameters or {}))
        assert want and all(w["score"] is None for w in want)
        same(got, want)
        assert all(mask_array(g["mask"]).shape == (image.height, image.width) for g in got)


@pytest.mark.parametrize("parameters", [None, {"subtask": "panoptic"}, {"subtask": "instance", "threshold": 0.5},
                                        {"subtask": "semantic"},
                                        {"threshold": 0.5, "mask_threshold": 0.3, "overlap_mask_area_threshold": 0.2}])
def test_mask_segmentation_matches_the_pipeline(mask_segmenter: Loaded, parameters: dict[str, Any] | None) -> None:
    model, pipe = mask_segmenter
    batch = same_as_single(model, parameters)
    for image, got in zip(IMAGES, batch, strict=True):
        same(got, pipe(image, **(parameters or {})))
    if parameters is None:
        assert any(batch) and all(isinstance(a["score"], float) for answer in batch for a in answer)


def test_a_subtask_the_model_cannot_do(segmenter: Loaded) -> None:
    model, _ = segmenter
    for subtask in ("panoptic", "instance"):
        with pytest.raises(InvalidRequest, match="semantic") as e:
            ask(model, [IMAGES[0]], {"subtask": subtask})
        assert e.value.param == "subtask"
    with pytest.raises(InvalidRequest):  # not a subtask at all: the request model refuses it
        ask(model, [IMAGES[0]], {"subtask": "depth"})


# ---- bad images ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["not base64 at all!", base64.b64encode(b"GIF89a but not really").decode(),
                                 b64png(IMAGES[0])[:40] + "A" * 4])
def test_an_invalid_image(classifier: Loaded, bad: str) -> None:
    model, _ = classifier
    with pytest.raises(InvalidRequest) as e:
        ask(model, [bad])
    assert e.value.param == "inputs"


def test_an_image_the_processor_refuses(detector: Loaded) -> None:
    model, _ = detector  # YOLOS keeps the aspect ratio: a 1x300 image would be 0 pixels wide
    with pytest.raises(InvalidRequest, match="1x300") as e:
        ask(model, [Image.new("RGB", (1, 300), "red")])
    assert e.value.param == "inputs"


def test_a_bad_image_fails_only_its_own_request(classifier: Loaded, detector: Loaded) -> None:
    thin = b64png(Image.new("RGB", (1, 300), "red"))
    for (model, _), bad in ((classifier, ["%%%"]), (detector, ["%%%", thin])):
        good = ask(model, [IMAGES[1]])[0]
        answers = ask(model, [IMAGES[1], *bad, IMAGES[1]])
        assert all(isinstance(a, InvalidRequest) for a in answers[1:-1])
        same(answers[0], good)
        same(answers[-1], good)
        with pytest.raises(InvalidRequest):
            ask(model, bad + bad)
