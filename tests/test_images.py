"""Checking the images a client sends: formats by content, limits, paths, data URLs."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from llmws_core import errors, images
from llmws_core.images import ImageLimits, InvalidImage

pytest.importorskip("PIL")

from tests.tiny_vlm import png  # noqa: E402

LIMITS = ImageLimits()


def test_base64_png_is_checked_into_its_media_type() -> None:
    """Base64 with a wrong media type is still known by its content."""
    raw = png()
    out = images.check_ref({"data": base64.b64encode(raw).decode(), "media_type": "image/jpeg"}, LIMITS)
    assert out == {"media_type": "image/png", "data": base64.b64encode(raw).decode()}
    assert images.to_pil(out).size == (64, 48)


def test_data_url_and_bare_string() -> None:
    """A data: URL and a bare base64 string name the same image."""
    b64 = base64.b64encode(png()).decode()
    assert images.check_ref(f"data:image/png;base64,{b64}", LIMITS) == images.check_ref(b64, LIMITS)
    assert images.check_ref({"url": f"data:image/png;base64,{b64}"}, LIMITS)["media_type"] == "image/png"


@pytest.mark.parametrize("raw", [b"not an image at all", png()[:60], b"\x89PNG\r\n\x1a\n" + b"\0" * 100])
def test_not_an_image_or_corrupt_is_invalid_image(raw: bytes) -> None:
    """Text, a truncated PNG and a PNG header over garbage are refused as invalid_image."""
    with pytest.raises(InvalidImage) as info:
        images.check_bytes(raw, LIMITS)
    assert info.value.code == "invalid_image"


def test_size_and_pixel_limits() -> None:
    """An image over the byte limit or the pixel limit is refused."""
    with pytest.raises(InvalidImage, match="bytes"):
        images.check_bytes(png(), ImageLimits(max_bytes=100))
    with pytest.raises(InvalidImage, match="pixels"):
        images.check_bytes(png(size=(100, 100)), ImageLimits(max_pixels=5000))


def test_count_limit() -> None:
    """More images than max_count in one request are refused before any is decoded."""
    b64 = base64.b64encode(png()).decode()
    with pytest.raises(InvalidImage, match="at most 2"):
        asyncio.run(images.resolve([b64] * 3, ImageLimits(max_count=2)))


def test_paths_only_where_allowed_and_only_to_images(tmp_path: Path) -> None:
    """A path is read only when allowed, must be absolute, and must hold an image by content."""
    pic = tmp_path / "pic.png"
    pic.write_bytes(png())
    secret = tmp_path / "secret.png"
    secret.write_text("password=hunter2")
    with pytest.raises(InvalidImage, match="loopback"):
        images.check_ref({"path": str(pic)}, LIMITS)
    assert images.check_ref({"path": str(pic)}, LIMITS, allow_path=True)["media_type"] == "image/png"
    with pytest.raises(InvalidImage, match="not an image"):
        images.check_ref({"path": str(secret)}, LIMITS, allow_path=True)
    with pytest.raises(InvalidImage, match="absolute"):
        images.check_ref({"path": "pic.png"}, LIMITS, allow_path=True)
    with pytest.raises(InvalidImage, match="No image file"):
        images.check_ref({"path": str(tmp_path)}, LIMITS, allow_path=True)


def test_remote_urls_need_the_setting() -> None:
    """An http(s) image URL is unsupported unless allow_image_urls is on; other schemes are invalid."""
    with pytest.raises(errors.Unsupported, match="allow_image_urls"):
        asyncio.run(images.resolve([{"url": "https://example.com/cat.png"}], LIMITS))
    with pytest.raises(InvalidImage):
        asyncio.run(images.resolve([{"url": "file:///etc/passwd"}], LIMITS))
