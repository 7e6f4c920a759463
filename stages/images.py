"""Decode image bytes into upright RGB arrays, or reject them with a reason.

One decoder serves every stage and the model server, so an image is read the
same way in training, evaluation and serving.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
DEFAULT_LIMITS = {"min_side": 32, "max_side": 10000, "max_pixels": 40_000_000}
WHITE = (255, 255, 255)


class ImageRejected(ValueError):
    """An input that is not a usable image; `reason` is a short code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Limits:
    """Size limits an image must meet, in pixels."""

    min_side: int = DEFAULT_LIMITS["min_side"]
    max_side: int = DEFAULT_LIMITS["max_side"]
    max_pixels: int = DEFAULT_LIMITS["max_pixels"]

    @classmethod
    def from_params(cls, params: dict) -> Limits:
        return cls(**{k: int(params[k]) for k in DEFAULT_LIMITS if k in params})


@dataclass
class Decoded:
    """An upright RGB image and the conversions it took to get there."""

    pixels: np.ndarray
    source_format: str
    conversions: list[str] = field(default_factory=list)


def decode(data: bytes, limits: Limits | None = None) -> Decoded:
    """Fully decode `data` to an upright uint8 RGB array, or raise ImageRejected."""
    limits = limits or Limits()
    if not data:
        raise ImageRejected("empty", "the file has no bytes")
    image = _open(data)
    _check_size(image.size, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageRejected("truncated", f"cannot decode the pixels ({err})") from None
    except Image.DecompressionBombWarning as err:
        raise ImageRejected("too_large", str(err)) from None
    source_format = image.format
    conversions: list[str] = []
    if _orientation(image) not in (None, 1):
        conversions.append("exif_rotated")
    upright = ImageOps.exif_transpose(image)
    rgb = _to_rgb(upright, conversions)
    return Decoded(np.asarray(rgb, dtype=np.uint8), source_format, conversions)


def _open(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "no known image format") from None
    except Image.DecompressionBombError as err:
        raise ImageRejected("too_large", str(err)) from None
    if image.format not in SUPPORTED_FORMATS:
        raise ImageRejected(
            "unsupported_format",
            f"{image.format} is not one of {', '.join(SUPPORTED_FORMATS)}",
        )
    return image


def _check_size(size: tuple[int, int], limits: Limits) -> None:
    width, height = size
    if min(width, height) < limits.min_side:
        raise ImageRejected(
            "too_small", f"{width}x{height} is under {limits.min_side} px a side"
        )
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise ImageRejected(
            "too_large",
            f"{width}x{height} is over {limits.max_side} px a side "
            f"or {limits.max_pixels} pixels",
        )


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # a broken EXIF block is not worth rejecting the image
        return None


def _to_rgb(image: Image.Image, conversions: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        conversions.append("16bit")
        wide = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if wide.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.round(wide / peak * 255).astype(np.uint8))
        mode = "L"
    if mode == "P" and "transparency" in image.info:
        conversions.append("palette")
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        conversions.append("alpha")
        background = Image.new("RGB", image.size, WHITE)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[3])
        return background
    conversions.append(
        {"L": "grayscale", "1": "grayscale", "CMYK": "cmyk", "P": "palette"}.get(
            mode, f"mode_{mode}"
        )
    )
    return image.convert("RGB")


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB array to size x size (bilinear), as float32 in 0..255."""
    image = Image.fromarray(pixels)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def load_for_model(data: bytes, size: int, limits: Limits | None = None) -> np.ndarray:
    """Decode and resize `data` into the model's input: size x size x 3 float32."""
    return resize(decode(data, limits).pixels, size)
