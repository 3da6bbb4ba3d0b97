"""Image tasks on the transformers pipelines: image-classification, zero-shot-image-classification (CLIP-style),
object-detection and image-segmentation.

The pipeline computes every answer (so answers equal what it gives in-process); this module picks its
parameters, batches, and shapes its output as the Hub Inference API answers it. The batch key holds every
parameter the pipeline takes, so one pipeline call serves a batch. Images whose preprocessed shape depends on
their size (detectors that keep the aspect ratio) are run in groups of one size: the pipeline stacks pixel
tensors without padding, and padding would change the answers anyway.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable
from typing import Any, cast

from server.engines.worker.media import LoadSpec, MediaModel, decode_image, load_pipeline, png_base64
from server.errors import InvalidRequest
from server.tasks.media_requests import (
    ImageClassificationRequest,
    ImageSegmentationRequest,
    MediaRequest,
    ObjectDetectionRequest,
    ZeroShotImageRequest,
)

TASKS = ("image-classification", "zero-shot-image-classification", "object-detection", "image-segmentation")
SUBTASKS = ("panoptic", "instance", "semantic")
Key = tuple[tuple[str, Any], ...]  # the pipeline's keyword arguments, hashable


def _present(**kwargs: Any) -> Key:
    """The arguments that were given: the ones left None take the pipeline's defaults."""
    return tuple((k, v) for k, v in kwargs.items() if v is not None)


def _fixed_size(processor: Any) -> bool:
    """Whether the image processor makes one pixel shape of every image (then any images batch together)."""
    from PIL import Image

    try:
        shapes = {tuple(processor(images=[Image.new("RGB", size)], return_tensors="pt")["pixel_values"].shape)
                  for size in ((40, 24), (24, 56))}
    except Exception:  # a processor that needs more than images: batch by size, which is always safe
        return False
    return len(shapes) == 1


class VisionModel(MediaModel):
    """One image pipeline; ``prepare`` turns the request's parameters into the pipeline's keyword arguments."""

    def __init__(self, spec: LoadSpec) -> None:
        self.task = spec.task
        self.pipe: Any = load_pipeline(spec)
        self.config = self.pipe.model.config
        self.fixed_size = _fixed_size(self.pipe.image_processor)
        self.subtasks = [s for s in SUBTASKS if hasattr(self.pipe.image_processor, f"post_process_{s}_segmentation")]
        if spec.task == "image-segmentation" and not self.subtasks:
            raise ValueError(f"{type(self.pipe.image_processor).__name__} has no segmentation post-processing")
        self.tokenizer: Any = None
        if spec.task == "zero-shot-image-classification":
            # A copy for the event loop: a fast tokenizer is not safe to share with the model thread.
            self.tokenizer = copy.deepcopy(self.pipe.tokenizer)
            text_config = getattr(self.config, "text_config", None)
            truncates = "siglip" in self.config.model_type  # the pipeline pads and truncates SigLIP's texts
            self.max_len = 0 if truncates else int(getattr(text_config, "max_position_embeddings", 0) or 0)

    def info(self) -> dict[str, Any]:
        return {"model_type": self.config.model_type} | ({"subtasks": self.subtasks} if self.subtasks else {})

    # ---- event loop --------------------------------------------------------------------------------------

    def prepare(self, request: MediaRequest) -> tuple[Any, Hashable]:
        if isinstance(request, ImageClassificationRequest):
            p = request.parameters
            return request.inputs, _present(top_k=p.top_k, function_to_apply=p.function_to_apply)
        if isinstance(request, ZeroShotImageRequest):
            labels = tuple(request.parameters.labels)
            template = request.parameters.hypothesis_template
            self._check_lengths(labels, template)
            return request.inputs, _present(candidate_labels=labels, hypothesis_template=template)
        if isinstance(request, ObjectDetectionRequest):
            return request.inputs, _present(threshold=request.parameters.threshold)
        if isinstance(request, ImageSegmentationRequest):
            s = request.parameters
            if s.subtask is not None and s.subtask not in self.subtasks:
                raise InvalidRequest(f"This model cannot do {s.subtask} segmentation; it does "
                                     f"{', '.join(self.subtasks)}.", param="subtask")
            return request.inputs, _present(subtask=s.subtask, threshold=s.threshold, mask_threshold=s.mask_threshold,
                                            overlap_mask_area_threshold=s.overlap_mask_area_threshold)
        raise InvalidRequest(f"This model serves {self.task}.")

    def _check_lengths(self, labels: tuple[str, ...], template: str | None) -> None:
        """Each hypothesis is formed (the template may hold other braces) and fits the text model."""
        form = template or "This is a photo of {}."  # the pipeline's default
        try:
            texts = [form.format(label) for label in labels]
        except (IndexError, KeyError, ValueError) as e:
            raise InvalidRequest(f"`hypothesis_template` must hold one `{{}}` and no other braces ({e!r}).",
                                 param="hypothesis_template") from e
        for label, text in zip(labels, texts, strict=True):
            if self.max_len and len(self.tokenizer(text)["input_ids"]) > self.max_len:
                raise InvalidRequest(f"The hypothesis for label {label!r} is longer than this model's {self.max_len} "
                                     "tokens.", param="candidate_labels")

    # ---- model thread ------------------------------------------------------------------------------------

    def run(self, items: list[Any], key: Hashable) -> list[Any]:
        """The answers; an image that does not decode, or that the image processor refuses (e.g. a 1x300 image
        for a detector that keeps the aspect ratio), fails its own request only.

        With several items, a bad one's answer is its ``InvalidRequest`` (the batcher should raise it for that
        request alone); when every item is bad (a batch of one included), ``run`` raises the first one's.
        """
        answers: list[Any] = [None] * len(items)
        images: dict[int, Any] = {}
        for i, item in enumerate(items):
            try:
                images[i] = decode_image(item)
            except InvalidRequest as e:
                answers[i] = e
        kwargs = dict(cast(Key, key))
        if "candidate_labels" in kwargs:
            kwargs["candidate_labels"] = list(kwargs["candidate_labels"])
        groups: dict[Hashable, list[int]] = {}
        for i, image in images.items():
            groups.setdefault(None if self.fixed_size else image.size, []).append(i)
        for indices in groups.values():
            self._answer(indices, images, kwargs, answers)
        if all(isinstance(a, InvalidRequest) for a in answers):
            raise answers[0]
        return answers

    def _answer(self, indices: list[int], images: dict[int, Any], kwargs: dict[str, Any], answers: list[Any]) -> None:
        """One pipeline call for images of one pixel shape; if it refuses them, each alone, to find the bad ones."""
        try:
            outputs = self.pipe([images[i] for i in indices], batch_size=len(indices), **kwargs)
        except ValueError as e:
            if len(indices) > 1:
                for i in indices:
                    self._answer([i], images, kwargs, answers)
                return
            width, height = images[indices[0]].size
            answers[indices[0]] = InvalidRequest(f"This model cannot read a {width}x{height} image: {e}",
                                                 param="inputs")
            return
        for i, output in zip(indices, outputs, strict=True):
            answers[i] = [self._shape(element) for element in output]

    def _shape(self, element: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"label": str(element["label"])}
        score = element.get("score")
        out["score"] = None if score is None else float(score)
        if self.task == "object-detection":
            out["box"] = {side: int(element["box"][side]) for side in ("xmin", "ymin", "xmax", "ymax")}
        elif self.task == "image-segmentation":
            out["mask"] = png_base64(element["mask"])
        return out


def load(spec: LoadSpec) -> MediaModel:
    if spec.task not in TASKS:
        raise ValueError(f"vision.py serves {', '.join(TASKS)}, not {spec.task}")
    return VisionModel(spec)
