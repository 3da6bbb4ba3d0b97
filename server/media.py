"""Images and audio inside requests: found in the JSON of every family, checked before an engine sees them.

``find_media`` is pure: it walks a chat's ``messages``, a response's ``input`` or a message's content blocks
(OpenAI ``image_url`` / ``input_image`` / ``input_audio``, Anthropic ``image`` blocks, nested tool results too)
and returns what it found. ``check_media`` decodes what it must (base64, image headers, audio headers) and so
runs in a worker thread, never on the event loop. Limits come from Settings; each refusal names the limit and
where in the request the item was, and takes the family's shape (the caller's route sets it).

The server is offline: remote media URLs are refused; ``file://`` URLs only inside
``HUBSERVE_ALLOWED_LOCAL_MEDIA_PATH`` (which vLLM gets as ``--allowed-local-media-path``).
"""

from __future__ import annotations

import asyncio
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from server.errors import InvalidRequest, RequestTooLarge
from server.settings import Settings

Kind = Literal["image", "audio", "video", "embeds"]
# content part / block types → what they carry
PART_KINDS: dict[str, Kind] = {
    "image_url": "image", "input_image": "image", "image": "image",
    "input_audio": "audio", "audio_url": "audio",
    "video_url": "video", "input_video": "video", "video": "video",
    "image_embeds": "embeds", "audio_embeds": "embeds",  # raw tensors for the engine: never from the network
}
# A JSON string may spell a type with \u escapes ("\u0069mage_url"): such a body is always walked.
MEDIA_MARKERS = (b'"image', b'"input_image', b'"input_audio', b'"audio_url', b'"audio_embeds', b'"video', b"\\u")
PIL_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
             "TIFF": "image/tiff"}
DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class MediaRef:
    kind: Kind
    where: str  # e.g. messages[0].content[1]
    url: str | None = None
    data: str | None = None  # base64 (Anthropic source.data, OpenAI input_audio.data)
    media_type: str | None = None  # what the request declares


@dataclass(frozen=True)
class MediaLimits:
    max_images: int
    max_image_bytes: int
    max_image_pixels: int
    image_types: frozenset[str]
    local_root: Path | None
    max_audio_bytes: int
    max_audio_seconds: float

    @classmethod
    def from_settings(cls, s: Settings) -> MediaLimits:
        root = s.allowed_local_media_path.resolve() if s.allowed_local_media_path is not None else None
        types = frozenset(t.strip().lower() for t in s.image_types.split(",") if t.strip())
        return cls(s.max_images_per_request, s.max_image_bytes, s.max_image_pixels, types, root,
                   s.max_audio_bytes, s.max_audio_seconds)


def may_hold_media(body: bytes) -> bool:
    """A cheap test on the raw body: text-only requests skip the walk entirely."""
    return any(marker in body for marker in MEDIA_MARKERS)


def _ref(part: dict[str, Any], kind: Kind, where: str) -> MediaRef:
    if kind == "embeds":
        raise InvalidRequest(f"{where}: {part['type']} parts are not accepted; send the media itself.", param=where)
    value = part.get(part["type"]) or part.get("image_url")  # Responses: {"type": "input_image", "image_url": ...}
    if part["type"] == "input_audio" and isinstance(value, dict):  # {"data": b64, "format": "wav"}
        fmt = value.get("format")
        return MediaRef(kind, where, data=str(value.get("data") or ""), media_type=f"audio/{fmt}" if fmt else None)
    source = part.get("source")
    if isinstance(source, dict):  # Anthropic: {"type": "base64", "media_type", "data"} | {"type": "url", "url"}
        if source.get("type") == "base64":
            return MediaRef(kind, where, data=str(source.get("data") or ""), media_type=source.get("media_type"))
        return MediaRef(kind, where, url=str(source.get("url") or ""))
    if isinstance(value, dict):  # OpenAI chat: {"image_url": {"url": ...}}
        value = value.get("url")
    if isinstance(value, str):
        return MediaRef(kind, where, url=value)
    if part.get("file_id"):
        raise InvalidRequest(f"{where}: file ids are not served here; send the {kind} inline as a data: URI.",
                             param=where)
    raise InvalidRequest(f"{where}: a {part['type']} part needs its {kind} (a data: URI or base64 data).",
                         param=where)


def find_media(payload: dict[str, Any]) -> list[MediaRef]:
    """Every image, audio or video item in the request's messages / input / system, in order. Pure."""
    found: list[MediaRef] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            part_type = node.get("type")
            kind = PART_KINDS.get(part_type) if isinstance(part_type, str) else None
            if kind is not None:
                found.append(_ref(node, kind, where))
                return
            for key, value in node.items():
                if isinstance(value, list | dict):
                    walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")

    for key in ("messages", "input", "system"):
        if isinstance(payload.get(key), list | dict):
            walk(payload[key], key)
    return found


def refuse_unsupported(refs: list[MediaRef], model: str, accepts: tuple[str, ...]) -> None:
    """InvalidRequest naming the model when the request carries what the model cannot take in."""
    for ref in refs:
        if ref.kind not in accepts:
            takes = " and ".join(accepts)
            raise InvalidRequest(f"Model `{model}` takes {takes} input only; it cannot read the {ref.kind} at "
                                 f"{ref.where}.", param=ref.where)


# ---- checking (in a worker thread) -----------------------------------------------------------------------------


def check_media(refs: list[MediaRef], limits: MediaLimits) -> None:
    """Refuse what breaks a limit: count, bytes, pixels, content type, duration, where the bytes come from."""
    images = [r for r in refs if r.kind == "image"]
    if len(images) > limits.max_images:
        raise InvalidRequest(f"The request carries {len(images)} images; the limit is {limits.max_images} "
                             "(HUBSERVE_MAX_IMAGES_PER_REQUEST).", param=images[limits.max_images].where)
    for ref in refs:
        if ref.kind == "video":
            raise InvalidRequest(f"{ref.where}: video input is not served.", param=ref.where)
        cap = limits.max_image_bytes if ref.kind == "image" else limits.max_audio_bytes
        data, declared = _bytes_of(ref, limits, cap)
        if ref.kind == "image":
            _check_image(ref.where, data, declared, limits)
        else:
            check_audio(ref.where, data, limits)


def check_bytes(kind: Literal["image", "audio"], where: str, data: bytes, declared: str | None,
                limits: MediaLimits) -> None:
    """One image or audio file's bytes against the limits (type sniffed, declared type must agree)."""
    if kind == "image":
        if len(data) > limits.max_image_bytes:
            raise _too_large(where, "image", len(data), limits.max_image_bytes)
        _check_image(where, data, declared, limits)
    else:
        check_audio(where, data, limits)


def decode_inline(kind: Literal["image", "audio"], where: str, text: str, limits: MediaLimits
                  ) -> tuple[bytes, str | None]:
    """An inline item of a Hub task request (base64, or a data: URI) as bytes and its declared type; remote URLs
    are refused (the server is offline)."""
    cap = limits.max_image_bytes if kind == "image" else limits.max_audio_bytes
    head = text[:16].lower()
    if head.startswith(("http://", "https://")):
        raise InvalidRequest(f"{where}: remote URLs are not fetched (this server is offline); send the {kind}'s bytes "
                             "as the body, or base64 in JSON.", param=where)
    match = DATA_URI.match(text) if head.startswith("data:") else None
    if match:
        declared = match.group("type").lower() if match.group("type") else None
        return _b64decode(where, text[match.end():], kind, cap), declared
    return _b64decode(where, text, kind, cap), None


def _too_large(where: str, kind: str, size: int, cap: int) -> RequestTooLarge:
    setting = "HUBSERVE_MAX_IMAGE_BYTES" if kind == "image" else "HUBSERVE_MAX_AUDIO_BYTES"
    return RequestTooLarge(f"{where}: the {kind} is {size} bytes; the limit is {cap} bytes ({setting}).", param=where)


def _b64decode(where: str, text: str, kind: str, cap: int) -> bytes:
    if len(text) * 3 // 4 > cap + 3:  # refused before decoding
        raise _too_large(where, kind, len(text) * 3 // 4, cap)
    try:
        data = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as e:
        raise InvalidRequest(f"{where}: the {kind} is not valid base64 ({e}).", param=where) from e
    if len(data) > cap:
        raise _too_large(where, kind, len(data), cap)
    return data


def _bytes_of(ref: MediaRef, limits: MediaLimits, cap: int) -> tuple[bytes, str | None]:
    """The item's bytes and its declared content type (data: URIs, base64 fields, allowed local files)."""
    if ref.data is not None:
        return _b64decode(ref.where, ref.data, ref.kind, cap), ref.media_type
    url = ref.url or ""
    match = DATA_URI.match(url)
    if match:
        if not match.group("b64"):
            raise InvalidRequest(f"{ref.where}: data: URIs must be base64-encoded.", param=ref.where)
        declared = match.group("type").lower() if match.group("type") else None
        return _b64decode(ref.where, url[match.end():], ref.kind, cap), declared
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return _local_file(ref, limits, cap), None
    if scheme in ("http", "https"):
        raise InvalidRequest(f"{ref.where}: remote {ref.kind} URLs are not fetched (this server is offline); send "
                             f"the {ref.kind} inline as a data: URI.", param=ref.where)
    raise InvalidRequest(f"{ref.where}: unsupported {ref.kind} URL; send a data: URI.", param=ref.where)


def _local_file(ref: MediaRef, limits: MediaLimits, cap: int) -> bytes:
    if limits.local_root is None:
        raise InvalidRequest(f"{ref.where}: file:// URLs are refused (HUBSERVE_ALLOWED_LOCAL_MEDIA_PATH is not set).",
                             param=ref.where)
    path = Path(unquote(urlsplit(ref.url or "").path)).resolve()
    if not path.is_relative_to(limits.local_root) or not path.is_file():
        raise InvalidRequest(f"{ref.where}: the file is not inside the allowed local media directory.",
                             param=ref.where)
    size = path.stat().st_size
    if size > cap:
        raise _too_large(ref.where, ref.kind, size, cap)
    return path.read_bytes()


def _check_image(where: str, data: bytes, declared: str | None, limits: MediaLimits) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only: no decompression bomb
            sniffed = PIL_TYPES.get(image.format or "", f"image/{(image.format or 'unknown').lower()}")
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidRequest(f"{where}: the bytes are not an image this server reads.", param=where) from e
    if sniffed not in limits.image_types:
        allowed = ", ".join(sorted(limits.image_types))
        raise InvalidRequest(f"{where}: {sniffed} images are not accepted (accepted: {allowed}).", param=where)
    if declared is not None and declared.replace("image/jpg", "image/jpeg") != sniffed:
        raise InvalidRequest(f"{where}: declared {declared}, but the bytes are {sniffed}.", param=where)
    if width * height > limits.max_image_pixels:
        raise InvalidRequest(f"{where}: the image is {width}x{height} pixels; the limit is {limits.max_image_pixels} "
                             "pixels (HUBSERVE_MAX_IMAGE_PIXELS).", param=where)


def audio_seconds(data: bytes) -> float | None:
    """The duration of an audio file (wav, flac, ogg, mp3: libsndfile reads them), or None if unreadable."""
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
    except (RuntimeError, TypeError, ValueError, soundfile.LibsndfileError):
        return None
    return float(info.frames) / float(info.samplerate) if info.samplerate else None


def check_audio(where: str, data: bytes, limits: MediaLimits) -> None:
    if len(data) > limits.max_audio_bytes:
        raise _too_large(where, "audio", len(data), limits.max_audio_bytes)
    seconds = audio_seconds(data)
    if seconds is None:
        raise InvalidRequest(f"{where}: the bytes are not audio this server reads (wav, flac, ogg, mp3).", param=where)
    if seconds > limits.max_audio_seconds:
        raise InvalidRequest(f"{where}: the audio is {seconds:.1f} s long; the limit is {limits.max_audio_seconds:g} s "
                             "(HUBSERVE_MAX_AUDIO_SECONDS).", param=where)


async def check_request_media(body: bytes, payload: dict[str, Any], model: str, snapshot: str,
                              settings: Settings) -> list[MediaRef]:
    """Every family's one call: refuse media the model cannot take or that breaks a limit (decoding in a
    thread). Text-only bodies cost one substring scan."""
    if not may_hold_media(body):
        return []
    refs = find_media(payload)
    if refs:
        from server.engines.capabilities import input_modalities

        refuse_unsupported(refs, model, input_modalities(snapshot))
        await asyncio.to_thread(check_media, refs, MediaLimits.from_settings(settings))
    return refs
