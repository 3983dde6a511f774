"""Images in prompts: what a client sends, checked into one shape every backend reads.

A client names an image in one of these ways (each door maps its wire shape onto them):

- `{"data": "<base64>", "media_type": "image/png"}` (the media type is checked, not trusted),
- a `data:image/...;base64,...` URL (`{"url": ...}` or the bare string),
- a bare base64 string,
- `{"path": "/abs/file.png"}`: a file on the daemon's machine, only for a loopback peer,
- `{"url": "https://..."}`: fetched only when `security.allow_image_urls` is on.

`check_bytes` is the one gate: the bytes must be an image by their content (magic
numbers, then a full decode by Pillow), within `max_image_bytes` and
`max_image_pixels`. What comes out is a *checked image*, the dict
`{"media_type": "image/png", "data": "<base64>"}` that messages carry (a user
message's `images` list), that session history keeps (sealed like everything else)
and that backends decode with `to_pil`.

Decoding is CPU work: callers on the event loop use `resolve` (a worker thread).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import errors

logger = logging.getLogger("llmws.images")

#: A checked image: {"media_type": "image/...", "data": "<base64 of the file>"}.
CheckedImage = dict[str, str]

#: Leading bytes of the formats accepted, and their media types.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)
_PIL_MEDIA = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
FETCH_TIMEOUT = 20.0


class InvalidImage(errors.BadRequest):
    """An image that is not one, is corrupt, or is over the size limits."""

    code = "invalid_image"


@dataclass(frozen=True)
class ImageLimits:
    """What one request may carry (from `limits` and `security` in the config)."""

    max_count: int = 8
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    allow_urls: bool = False

    @classmethod
    def of(cls, settings: Any) -> ImageLimits:
        lim, sec = settings.limits, settings.security
        return cls(lim.max_images_per_request, lim.max_image_bytes, lim.max_image_pixels, sec.allow_image_urls)


def sniff(raw: bytes) -> str | None:
    """The media type the leading bytes announce (None: not a format accepted here)."""
    for magic, media in _MAGIC:
        if raw.startswith(magic):
            return media
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_bytes(raw: bytes, limits: ImageLimits) -> CheckedImage:
    """Check that `raw` is a whole image within the limits; its checked form.

    Raises:
        InvalidImage: too large, not an image, corrupt, or too many pixels.
    """
    if len(raw) > limits.max_bytes:
        raise InvalidImage(f"An image is {len(raw)} bytes; the limit is {limits.max_bytes}.")
    media = sniff(raw)
    if media is None:
        raise InvalidImage("That is not an image (PNG, JPEG, GIF, WebP or BMP).")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            if width * height > limits.max_pixels:
                raise InvalidImage(f"An image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels.")
            img.load()  # a full decode: a truncated or corrupt file fails here
            media = _PIL_MEDIA.get(img.format or "", media)
    except InvalidImage:
        raise
    except Exception as exc:  # Pillow raises many types for broken files (incl. DecompressionBombError)
        logger.info("image refused: %s", exc)
        raise InvalidImage("An image is corrupt or could not be decoded.") from None
    return {"media_type": media, "data": base64.b64encode(raw).decode("ascii")}


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("An image's base64 data is not valid base64.") from None


def _data_url(url: str) -> bytes:
    head, sep, body = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise InvalidImage("A data: URL needs a comma before its data.")
    if not head.endswith(";base64"):
        raise InvalidImage("Only base64 data: URLs carry images here.")
    return _b64(body)


def _read_path(path: str, limits: ImageLimits) -> bytes:
    p = Path(path)
    if not p.is_absolute():
        raise InvalidImage("An image path must be absolute.")
    try:
        if not p.is_file():
            raise InvalidImage("No image file at that path.")
        with p.open("rb") as f:
            raw = f.read(limits.max_bytes + 1)
    except InvalidImage:
        raise
    except OSError:
        raise InvalidImage("The image file could not be read.") from None
    # The content decides, never the name: a path is no way to read other files.
    if sniff(raw[:16]) is None:
        raise InvalidImage("That file is not an image (PNG, JPEG, GIF, WebP or BMP).")
    return raw


def _ref_parts(ref: Any) -> tuple[str, str]:
    """(kind, value) of one reference: kind is "data", "url" or "path"."""
    if isinstance(ref, str):
        return ("url", ref) if ref.startswith("data:") else ("data", ref)
    if hasattr(ref, "model_dump"):  # protocol.ImageRef
        ref = ref.model_dump(exclude_none=True)
    if isinstance(ref, dict):
        for kind in ("data", "url", "path"):
            value = ref.get(kind)
            if isinstance(value, str) and value:
                return kind, value
    raise InvalidImage("An image needs data (base64), a url or a path.")


def check_count(refs: list[Any] | None, limits: ImageLimits) -> None:
    """Raises InvalidImage when a request carries more images than allowed."""
    if refs and len(refs) > limits.max_count:
        raise InvalidImage(f"A request may carry at most {limits.max_count} images; this one has {len(refs)}.")


def check_ref(ref: Any, limits: ImageLimits, *, allow_path: bool = False) -> CheckedImage:
    """One inline reference (base64, data: URL, or a path where allowed), checked (blocking).

    Raises:
        InvalidImage: the image is bad, a path was not allowed, or a remote URL (use `resolve`).
    """
    kind, value = _ref_parts(ref)
    if kind == "path":
        if not allow_path:
            raise InvalidImage("Image paths are accepted only from a client on this machine (loopback).")
        return check_bytes(_read_path(value, limits), limits)
    if kind == "url":
        if value.startswith("data:"):
            return check_bytes(_data_url(value), limits)
        raise InvalidImage("Only data: URLs are read inline.")
    # A base64 string's decoded size is 3/4 of it: refuse a huge one before decoding.
    if len(value) > limits.max_bytes * 4 // 3 + 16:
        raise InvalidImage(f"An image is larger than the limit of {limits.max_bytes} bytes.")
    return check_bytes(_b64(value), limits)


async def _fetch(url: str, limits: ImageLimits) -> bytes:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=True) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise InvalidImage(f"The image URL answered HTTP {resp.status_code}.")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise InvalidImage(f"The image at that URL is larger than {limits.max_bytes} bytes.")
                return bytes(body)
    except InvalidImage:
        raise
    except httpx.HTTPError as exc:
        logger.info("image fetch failed: %s", exc)
        raise InvalidImage("The image URL could not be fetched.") from None


async def resolve(refs: list[Any] | None, limits: ImageLimits, *, allow_path: bool = False) -> list[CheckedImage]:
    """Check a request's image references (decoding in a worker thread); their checked forms.

    Remote http(s) URLs are fetched only when `limits.allow_urls`.

    Raises:
        InvalidImage: too many images, or one that is bad (see `check_ref`).
        Unsupported: a remote URL while fetching is off.
    """
    if not refs:
        return []
    check_count(refs, limits)
    out: list[CheckedImage] = []
    for ref in refs:
        kind, value = _ref_parts(ref)
        if kind == "url" and not value.startswith("data:"):
            if not value.lower().startswith(("http://", "https://")):
                raise InvalidImage("An image URL must be a data: URL or http(s).")
            if not limits.allow_urls:
                raise errors.Unsupported(
                    "Image URLs are not fetched by this server (security.allow_image_urls is off); "
                    "send the image inline as a base64 data: URL."
                )
            raw = await _fetch(value, limits)
            out.append(await asyncio.to_thread(check_bytes, raw, limits))
        else:
            out.append(await asyncio.to_thread(check_ref, ref, limits, allow_path=allow_path))
    return out


def to_pil(image: CheckedImage) -> Any:
    """A checked image as an RGB `PIL.Image` (blocking; for backends)."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(image["data"]))) as img:
        return img.convert("RGB")


def to_bytes(image: CheckedImage) -> bytes:
    """A checked image's file bytes."""
    return base64.b64decode(image["data"])


def data_url(image: CheckedImage) -> str:
    """A checked image as a data: URL (for backends that take OpenAI-shaped parts)."""
    return f"data:{image['media_type']};base64,{image['data']}"


def openai_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages in OpenAI's shape (for llama-cpp-python's multimodal handler and LiteLLM
    providers): a message with images has content parts, its images (as data: URLs)
    before its text; other messages are left as they are."""
    out = []
    for m in messages:
        rest = {k: v for k, v in m.items() if k != "images"}
        pics = m.get("images") or ()
        if pics:
            parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pics]
            parts.append({"type": "text", "text": m.get("content") or ""})
            rest["content"] = parts
        out.append(rest)
    return out


def count(messages: list[dict[str, Any]]) -> int:
    """Images the messages carry."""
    return sum(len(m.get("images") or ()) for m in messages)
