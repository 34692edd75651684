"""Turn uploaded bytes into an RGB image: validate the header first, decode only what is safe."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from task import InputTooLargeError, InvalidInputError, UnsupportedInputError

# What we decode. (Camera JPEGs that Pillow labels MPO are opened by its JPEG plugin.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF")
# Recognised by their first bytes but not accepted (Pillow cannot decode them, or should not: EPS runs Ghostscript).
_KNOWN_UNSUPPORTED = {
    b"%PDF": "PDF",
    b"%!PS": "PostScript",
    b"8BPS": "PSD",
    b"<svg": "SVG",
    b"<?xm": "SVG/XML",
}
_FTYP_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF"}

Image.init()  # register every plugin now: `formats=` only knows plugins already loaded
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, not a grey half-image


def _unsupported_name(data: bytes) -> str | None:
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12], "ISO media")
    return _KNOWN_UNSUPPORTED.get(data[:4])


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Read the header of `data` (no pixels yet), or raise an InvalidInputError saying what was wrong.

    The pixel limit is checked here, before any pixel is allocated.
    """
    if not data:
        raise InvalidInputError("empty upload: the file has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        name = _unsupported_name(data) or _pillow_format(data)
        if name:
            raise UnsupportedInputError(
                f"unsupported image format {name}; send one of {', '.join(ACCEPTED_FORMATS)}"
            ) from None
        raise InvalidInputError("not an image: the upload is not a recognised image format") from None
    except Image.DecompressionBombError as exc:  # Pillow's own backstop, far above our limit
        raise InputTooLargeError(f"image is over the pixel limit of {max_pixels}: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInputError(f"corrupt image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInputError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    return image


def decode_rgb(image: Image.Image, *, draft_size: int | None = None) -> Image.Image:
    """Decode an opened image to upright RGB.

    With `draft_size`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, several
    times faster on big photos) as long as its shorter side stays >= draft_size.
    """
    try:
        if draft_size and image.format == "JPEG":
            width, height = image.size
            scale = min(width, height) / draft_size
            image.draft("RGB", (int(width / scale), int(height / scale)))
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidInputError(f"corrupt or truncated {image.format} image: {exc}") from None


def _pillow_format(data: bytes) -> str | None:
    """Name the format if Pillow recognises it at all (it is then known but not accepted)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Exception:  # anything Pillow cannot even identify is simply "not an image"
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # 16/32-bit grayscale (16-bit PNG, TIFF): keep the top 8 bits, do not clip
        wide = np.asarray(image, dtype=np.uint32) >> 8
        return Image.fromarray(np.minimum(wide, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have arbitrary colour underneath: show them on white, as a viewer would.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
