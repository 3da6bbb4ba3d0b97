"""text-to-image and image-to-image: diffusers pipelines (AutoPipelineForText2Image / AutoPipelineForImage2Image).

The answer is the PNG of the pipeline's first image (``InferenceClient`` opens the bytes with PIL). A request
parameter is passed only when it is set (None: the pipeline's default, e.g. the size ``unet.sample_size *
vae_scale_factor``) and refused when the pipeline's ``__call__`` does not take it (SD image-to-image has no
``height``/``width``: it uses ``target_size``, the input image resized). ``seed`` seeds a ``torch.Generator`` on
the model's device per request (none: a random seed); ``scheduler`` names a scheduler class compatible with the
pipeline's, built with ``from_config(pipe.scheduler.config)`` and swapped in for that call (one batch runs at a
time, on the model thread). The repo's own safety checker, if it has one, runs; none is ever added.

Batching: requests that share every parameter but prompt, negative prompt text and seed share a key. On an
accelerator the batch is one pipeline call (a list of prompts, a list of generators: each item draws its own
noise). On CPU the items of a batch run one by one: a batched forward sums in another order than a single one
(the UNet's output moves by ~1e-6), which flips a pixel by one level now and then, so a seeded request would
depend on what it was batched with; on CPU one image already uses every core, so batching buys little there.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from server.engines.worker.media import Binary, LoadSpec, MediaModel, decode_image, encode_png
from server.errors import InvalidRequest
from server.tasks.media_requests import ImageToImageRequest, MediaRequest, TextToImageRequest

# Request parameters passed to the pipeline under the same name when set.
CALL_PARAMETERS = ("height", "width", "num_inference_steps", "guidance_scale", "strength")


@dataclass(frozen=True)
class _Item:
    prompt: str | None
    negative_prompt: str | None
    seed: int
    image: str | None = None  # base64 (image-to-image), decoded on the model thread


@dataclass(frozen=True)
class _Key:
    scheduler: str | None  # None: the pipeline's own
    call: tuple[tuple[str, Any], ...]  # the pipeline arguments the batch shares
    negative: bool  # negative_prompt given (None and "" differ for some pipelines, e.g. SDXL)
    target_size: tuple[int, int] | None  # (width, height) the input image is resized to


def _dtype(spec: LoadSpec) -> Any:
    """The spec's dtype; "auto" (GPU): bfloat16 where the device has it (fp16's range overflows some VAEs)."""
    import torch

    if spec.dtype != "auto":
        return spec.dtype
    if spec.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _default_size(pipe: Any) -> tuple[int, int] | None:
    """(height, width) of the pipeline's default image: the UNet's sample size times the VAE's scale factor."""
    sample = getattr(getattr(getattr(pipe, "unet", None), "config", None), "sample_size", None)
    factor = getattr(pipe, "vae_scale_factor", None)
    if isinstance(sample, int) and isinstance(factor, int):
        return sample * factor, sample * factor
    return None


class Diffusion(MediaModel):
    def __init__(self, pipe: Any, task: str, device: Any, batched: bool) -> None:
        self.pipe = pipe
        self.task = task
        self.device = device
        self.batched = batched  # one pipeline call per batch (see the module docstring)
        self.signature = inspect.signature(pipe.__call__).parameters
        own = type(pipe.scheduler)
        self.own_scheduler = own.__name__
        self.schedulers = {cls.__name__: cls for cls in pipe.scheduler.compatibles} | {own.__name__: own}
        need = "image" if task == "image-to-image" else "prompt"
        if need not in self.signature:
            raise ValueError(f"{type(pipe).__name__} takes no `{need}`: it does not serve {task}")
        limit = getattr(getattr(pipe, "tokenizer", None), "model_max_length", 0)
        self.max_len = int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else 0

    def info(self) -> dict[str, Any]:
        size = _default_size(self.pipe)
        return {"pipeline": type(self.pipe).__name__, "scheduler": self.own_scheduler,
                "schedulers": sorted(self.schedulers)} | ({"default_height": size[0], "default_width": size[1]}
                                                          if size else {})

    def _default(self, name: str) -> Any:
        parameter = self.signature.get(name)
        return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    def _scheduler(self, name: str | None) -> str | None:
        if name is None or name == self.own_scheduler:
            return None
        if name in self.schedulers:
            return name
        import diffusers

        compatible = ", ".join(sorted(self.schedulers))
        found = getattr(diffusers, name, None)
        what = ("is not compatible with this model's pipeline" if isinstance(found, type)
                and issubclass(found, diffusers.SchedulerMixin) else "is not a diffusers scheduler")
        raise InvalidRequest(f"`scheduler` {name!r} {what}; use one of: {compatible}.", param="scheduler")

    def prepare(self, request: MediaRequest) -> tuple[_Item, Hashable]:
        assert isinstance(request, TextToImageRequest | ImageToImageRequest)
        p = request.parameters
        if isinstance(request, ImageToImageRequest):
            prompt, image = request.parameters.prompt, request.inputs
            size = request.parameters.target_size
            target = (size.width, size.height) if size else None
        else:
            prompt, image, target = request.inputs, None, None
        known = type(p).model_fields  # not extra fields (unknown ones are ignored, unvalidated)
        call = {name: getattr(p, name) for name in CALL_PARAMETERS if name in known and getattr(p, name) is not None}
        given = [*call, *(["negative_prompt"] if p.negative_prompt is not None else []),
                 *(["prompt"] if prompt is not None else [])]
        for name in given:
            if name not in self.signature:
                raise InvalidRequest(f"`{name}` is not a parameter of this model ({type(self.pipe).__name__}).",
                                     param=name)
        if "strength" in self.signature:  # img2img pipelines denoise int(steps * strength) steps
            steps = call.get("num_inference_steps", self._default("num_inference_steps"))
            strength = call.get("strength", self._default("strength"))
            if isinstance(steps, int) and isinstance(strength, float) and int(steps * strength) < 1:
                raise InvalidRequest(f"`num_inference_steps` ({steps}) times `strength` ({strength}) leaves no "
                                     "denoising step; raise either.", param="strength")
        scheduler = self._scheduler(p.scheduler)
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        key = _Key(scheduler, tuple(sorted(call.items())), p.negative_prompt is not None, target)
        return _Item(prompt, p.negative_prompt, seed, image), key

    def run(self, items: list[_Item], key: Hashable) -> list[Any]:
        from PIL import Image

        assert isinstance(key, _Key)
        images: list[Any] = []
        if self.task == "image-to-image":
            for item in items:
                decoded = decode_image(item.image or "")
                if key.target_size and decoded.size != key.target_size:
                    decoded = decoded.resize(key.target_size, Image.Resampling.LANCZOS)
                images.append(decoded)
        groups: dict[Any, list[int]] = {}
        for i in range(len(items)):  # one call per group; images in one call must share a size
            groups.setdefault((images[i].size if images else None) if self.batched else i, []).append(i)
        answers: list[Any] = [None] * len(items)
        default = self.pipe.scheduler
        if key.scheduler is not None:  # a fresh one, as `from_config` in-process would give
            self.pipe.scheduler = self.schedulers[key.scheduler].from_config(default.config)
        try:
            for group in groups.values():
                outputs = self._call([items[i] for i in group], [images[i] for i in group] if images else [], key)
                for i, output in zip(group, outputs, strict=True):
                    answers[i] = Binary(encode_png(output), "image/png")
        finally:
            self.pipe.scheduler = default
        return answers

    def _call(self, items: list[_Item], images: list[Any], key: _Key) -> list[Any]:
        import torch

        kwargs: dict[str, Any] = dict(key.call)
        if "prompt" in self.signature:
            kwargs["prompt"] = [item.prompt or "" for item in items]
        if key.negative:
            kwargs["negative_prompt"] = [item.negative_prompt or "" for item in items]
        if images:
            kwargs["image"] = images
        kwargs["generator"] = [torch.Generator(device=self.device).manual_seed(item.seed) for item in items]
        if "num_images_per_prompt" in self.signature:
            kwargs["num_images_per_prompt"] = 1
        try:
            out = self.pipe(**kwargs, output_type="pil")
        except ValueError as e:  # diffusers' input checks (check_inputs) raise ValueError
            raise InvalidRequest(f"The pipeline refused the parameters: {e}") from e
        return list(out.images)


def load(spec: LoadSpec) -> Diffusion:
    import diffusers

    image2image = spec.task == "image-to-image"
    auto = diffusers.AutoPipelineForImage2Image if image2image else diffusers.AutoPipelineForText2Image
    kwargs = {"revision": spec.revision, "dtype": _dtype(spec), "use_safetensors": True,
              "trust_remote_code": spec.trust_remote_code}
    try:
        pipe = auto.from_pretrained(spec.repo, **kwargs)
    except ValueError as e:  # a pipeline the auto mapping does not list (e.g. instruct-pix2pix): its own class
        if "AutoPipeline can't find" not in str(e):
            raise
        pipe = diffusers.DiffusionPipeline.from_pretrained(spec.repo, **kwargs)
    pipe = pipe.to(spec.device)
    pipe.set_progress_bar_config(disable=True)
    return Diffusion(pipe, spec.task, spec.device, batched=spec.device.type != "cpu")
