"""Safe image decoding, shared by both services.

Uploaded bytes are untrusted. `decode_image` opens them with Pillow restricted
to an allow-list of formats, refuses decompression bombs from the header's
size before any pixel is decoded, decodes fully (so a truncated file fails
here, not later in a worker), applies the EXIF orientation, and converts to RGB
exactly as `transformers`' `convert_to_rgb` does (transparency composited on
white), so our pixels match the reference processors'. Every failure is an
`InvalidInput` (`TooLarge` for the pixel limit) whose message names the problem.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.config.errors import InvalidInput, TooLarge

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def decode_image(data: bytes, *, max_pixels: int, allowed_formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS) -> Image.Image:
    """Decode untrusted bytes into an RGB image (EXIF orientation applied)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"image data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidInput("not an image: the data is empty (0 bytes)")
    formats = tuple(f.upper() for f in allowed_formats)

    # Pillow warns (DecompressionBombWarning) above Image.MAX_IMAGE_PIXELS and raises above twice that;
    # a warning is not a refusal, so it becomes an error here, while the header is read. catch_warnings
    # swaps a process-global filter list, so under threads another decode can restore the filters
    # mid-open (and a warning already shown once is not shown again): the size is checked against
    # Pillow's limit explicitly too.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=formats)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise TooLarge(f"image is over Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels: {exc}") from None
        except UnidentifiedImageError:
            raise _unidentified(data, formats) from None
        except Exception as exc:  # a header Pillow recognised but could not read
            raise InvalidInput(f"truncated or corrupt image header: {exc}") from None

        width, height = img.size
        if width <= 0 or height <= 0:
            raise InvalidInput(f"image has 0 pixels ({width}×{height})")
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise TooLarge(f"image is {width}×{height} = {width * height} pixels, over Pillow's "
                           f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels")
        # Our own limit, checked from the header before decoding a single pixel.
        if width * height > max_pixels:
            raise TooLarge(f"image is {width}×{height} = {width * height} pixels, over the limit of {max_pixels}")
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise TooLarge(f"image is over Pillow's decompression-bomb limit: {exc}") from None
        except Exception as exc:
            text = str(exc)
            if "truncated" in text.lower() or isinstance(exc, EOFError):
                raise InvalidInput(f"truncated image file ({img.format}: {text})") from None
            raise InvalidInput(f"corrupt {img.format} image data: {text}") from None

    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:
        raise InvalidInput(f"corrupt EXIF metadata in {img.format} image: {exc}") from None
    try:
        return to_rgb(img)
    except Exception as exc:  # exotic modes Pillow cannot convert (e.g. LAB)
        raise InvalidInput(f"cannot convert image mode {img.mode} to RGB: {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB exactly as `transformers.image_transforms.convert_to_rgb` makes it.

    Anything with an alpha band or a `transparency` entry (palette or colour-key
    tRNS) is composited onto opaque white; every other mode goes through Pillow's
    `convert("RGB")` (so 16-bit grayscale is clipped to 255, as in the reference).
    """
    if img.mode == "RGB" and img.info.get("transparency") is None:
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def image_info(img: Image.Image, data: bytes) -> dict:
    """What a container records about its source image."""
    return {
        "width": img.width,  # after EXIF orientation: the image the model saw
        "height": img.height,
        "format": sniff_format(data),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def sniff_format(data: bytes) -> str | None:
    """The format whose magic bytes `data` starts with (Pillow's own prefix tests; nothing is parsed)."""
    Image.init()
    prefix = bytes(data[:16])
    for name, (_, accept) in Image.OPEN.items():
        try:
            result = accept(prefix) if accept else False
        except Exception:
            continue
        if result and not isinstance(result, str):
            return name
    return None


def _unidentified(data: bytes, formats: tuple[str, ...]) -> InvalidInput:
    """Explain why no allowed format could open the data."""
    fmt = sniff_format(data)
    if fmt is None:
        return InvalidInput(f"not an image: the data matches none of the allowed formats ({', '.join(formats)})")
    if fmt not in formats:
        return InvalidInput(f"format {fmt} not allowed; allowed: {', '.join(formats)}")
    size = _header_size(data, fmt)
    if size is not None and (size[0] <= 0 or size[1] <= 0):
        return InvalidInput(f"image has 0 pixels ({size[0]}×{size[1]})")
    return InvalidInput(f"truncated or corrupt {fmt} header")


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """Width and height as the header states them, for the formats whose header Pillow
    refuses outright when a dimension is 0 (so the error can say so)."""
    try:
        if fmt == "PNG" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "GIF":
            return struct.unpack("<HH", data[6:10])
        if fmt == "BMP":
            (header_size,) = struct.unpack("<I", data[14:18])
            if header_size == 12:  # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", data[18:22])
            width, height = struct.unpack("<ii", data[18:26])
            return width, abs(height)  # negative height: top-down rows
    except struct.error:
        return None
    return None
