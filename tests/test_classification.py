"""The real task: the network is the reference one, photos come back right, uploads decode or fail clearly."""

from __future__ import annotations

import io
import math
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import classification
from classification.efficientnet_lite import SameConv2d
from classification.model import Classifier, ModelConfigError, lite0_weights_path
from settings import Settings
from task import InputTooLargeError, InvalidInputError, UnsupportedInputError

pytestmark = pytest.mark.model
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def model() -> Classifier:
    return classification.get_model(Settings())


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)())


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def top1(model: Classifier, data: bytes) -> str:
    label: str = classification.batch_classification(model, [classification.preprocess(model, data)])[0][0]["label"]
    return label


def test_network_matches_the_reference_implementation(model: Classifier) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(lite0_weights_path())).eval()
    items = [classification.preprocess(model, encode(photo(n), "JPEG", quality=92))
             for n in ("chelsea", "coffee", "astronaut", "rocket")]
    batch = torch.from_numpy(np.stack(items)).permute(0, 3, 1, 2).float()
    batch = (batch - model.mean) / model.std
    with torch.inference_mode():
        ours, theirs = model.net(batch), reference(batch)
    assert (ours - theirs).abs().max().item() < 1e-3


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [(14, 14), (15, 15), (14, 15), (7, 10), (224, 224)])
def test_same_padding_is_tensorflows_without_copying_the_input(kernel: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    conv = SameConv2d(4, 4, kernel, 2, groups=4, bias=True).eval()
    x = torch.randn(2, 4, *size)
    pads: list[int] = []  # TF "same": total = max((ceil(n / s) - 1) * s + k - n, 0), the odd zero bottom/right
    for n in reversed(size):
        total = max((math.ceil(n / 2) - 1) * 2 + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    expected = F.conv2d(F.pad(x, pads), conv.weight, conv.bias, 2, 0, 1, 4)
    with torch.inference_mode():
        got = conv(x)
    assert got.shape[-2:] == tuple(math.ceil(n / 2) for n in size)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("name", "expected"), [("chelsea", CATS), ("coffee", {"espresso", "cup"})])
def test_photos_are_classified_correctly(model: Classifier, name: str, expected: set[str]) -> None:
    result = classification.batch_classification(model, [classification.preprocess(model, encode(photo(name), "PNG"))])
    assert result[0][0]["label"] in expected
    assert len(result[0]) == 5
    scores = [p["score"] for p in result[0]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_batch_results_keep_order_and_match_single_runs(model: Classifier) -> None:
    items = [classification.preprocess(model, encode(photo(n), "PNG")) for n in ("coffee", "chelsea", "coffee")]
    batched = classification.batch_classification(model, items)
    singles = [classification.batch_classification(model, [item])[0] for item in items]
    assert [r[0]["index"] for r in batched] == [s[0]["index"] for s in singles]
    assert batched[0] == batched[2]


def _exif_rotated(image: Image.Image) -> bytes:
    # Stored turned a quarter to the left, with orientation 6 ("rotate 90 clockwise to view").
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def _rgba(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    rgba.putalpha(200)
    return rgba


def _gif(image: Image.Image) -> bytes:
    second = Image.new("RGB", image.size, (0, 0, 255))
    buffer = io.BytesIO()
    image.save(buffer, "GIF", save_all=True, append_images=[second])
    return buffer.getvalue()


UPLOADS: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg": lambda im: encode(im, "JPEG", quality=90),
    "jpeg-progressive": lambda im: encode(im, "JPEG", quality=90, progressive=True),
    "jpeg-cmyk": lambda im: encode(im.convert("CMYK"), "JPEG", quality=95),
    "jpeg-exif-rotated": _exif_rotated,
    "png": lambda im: encode(im, "PNG"),
    "png-palette": lambda im: encode(im.quantize(256), "PNG"),
    "png-rgba": lambda im: encode(_rgba(im), "PNG"),
    "gif-animated": _gif,
    "webp": lambda im: encode(im, "WEBP", quality=90),
    "avif": lambda im: encode(im, "AVIF", quality=90),
    "bmp": lambda im: encode(im, "BMP"),
    "tiff": lambda im: encode(im, "TIFF"),
    "large-4000px": lambda im: encode(im.resize((4000, 2660)), "JPEG", quality=85),
}


@pytest.mark.parametrize("kind", list(UPLOADS))
def test_colour_formats_are_classified(model: Classifier, kind: str) -> None:
    assert top1(model, UPLOADS[kind](photo("chelsea"))) in CATS


def test_exif_orientation_is_honoured(model: Classifier) -> None:
    upright = classification.preprocess(model, encode(photo("chelsea"), "JPEG", quality=95))
    rotated = classification.preprocess(model, _exif_rotated(photo("chelsea")))
    sideways = classification.preprocess(model, encode(photo("chelsea").transpose(Image.Transpose.ROTATE_90),
                                                       "JPEG", quality=95))
    assert np.abs(rotated.astype(int) - upright.astype(int)).mean() < 3  # JPEG noise only
    assert np.abs(sideways.astype(int) - upright.astype(int)).mean() > 20


def _png_16bit_gray(image: Image.Image) -> bytes:
    gray16 = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return encode(Image.fromarray(gray16), "PNG")


@pytest.mark.parametrize("make", [
    lambda im: encode(im.convert("L"), "PNG"),
    lambda im: encode(im.convert("LA"), "PNG"),
    _png_16bit_gray,
    lambda im: encode(im.resize((1, 1)), "PNG"),
    lambda im: encode(im.resize((3, 2)), "JPEG"),
], ids=["png-gray", "png-gray-alpha", "png-16bit-gray", "tiny-1x1", "tiny-3x2"])
def test_gray_and_tiny_images_are_classified(model: Classifier, make: Callable[[Image.Image], bytes]) -> None:
    item = classification.preprocess(model, make(photo("chelsea")))
    assert item.shape == (224, 224, 3) and item.dtype == np.uint8
    assert len(classification.batch_classification(model, [item])[0]) == 5


def test_16bit_gray_keeps_its_contrast(model: Classifier) -> None:
    eight = classification.preprocess(model, encode(photo("chelsea").convert("L"), "PNG"))
    sixteen = classification.preprocess(model, _png_16bit_gray(photo("chelsea")))
    assert np.abs(eight.astype(int) - sixteen.astype(int)).max() <= 1


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("data", "error", "message"), [
    (b"", InvalidInputError, "empty upload"),
    (b"hello, this is text", InvalidInputError, "not an image"),
    (b"%PDF-1.7\n%binary", UnsupportedInputError, "unsupported image format PDF"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", UnsupportedInputError, "unsupported image format HEIC"),
    (b"P6\n4 4\n255\n" + b"\x80" * 48, UnsupportedInputError, "unsupported image format PPM"),
])
def test_bad_uploads_say_what_is_wrong(model: Classifier, data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        classification.preprocess(model, data)


def test_truncated_jpeg_is_invalid(model: Classifier) -> None:
    data = encode(photo("chelsea"), "JPEG", quality=90)
    with pytest.raises(InvalidInputError, match="corrupt or truncated JPEG"):
        classification.preprocess(model, data[: len(data) // 2])


@pytest.mark.parametrize(("side", "message"), [(9_000, "9000x9000 = 81000000 pixels"), (100_000, "pixel limit")])
def test_decompression_bomb_is_refused_from_its_header(model: Classifier, side: int, message: str) -> None:
    bomb = _png_header_only(side, side)  # up to 10 gigapixels declared in a 100-byte file
    started = time.perf_counter()
    with pytest.raises(InputTooLargeError, match=message):
        classification.preprocess(model, bomb)
    assert time.perf_counter() - started < 0.5


def test_another_torchvision_model_from_local_weights(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    other = classification.get_model(Settings(model="mobilenet_v3_small", model_weights=str(path),
                                              top_k=3))
    result = classification.batch_classification(other, [classification.preprocess(other, encode(photo("coffee"),
                                                                                                   "PNG"))])
    assert len(result[0]) == 3 and all(0 <= p["index"] < 1000 for p in result[0])
    assert other.mean[0, 0, 0, 0].item() == pytest.approx(0.485 * 255)


def test_model_needs_local_weights_and_loads_strictly(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="needs MODEL_WEIGHTS"):
        classification.get_model(Settings(model="resnet18"))
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), wrong)
    with pytest.raises(RuntimeError, match="state_dict"):
        classification.get_model(Settings(model="resnet18", model_weights=str(wrong)))


def test_torch_compile_serves_the_same_answers(model: Classifier) -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = classification.get_model(Settings(torch_compile=True, max_batch_size=2))
    classification.warm_up(compiled, 2)
    assert counters["stats"]["unique_graphs"] == 2  # one graph per batch size, both compiled before serving
    items = [classification.preprocess(model, encode(photo(n), "PNG")) for n in ("chelsea", "coffee")]
    for batch in (items, items[:1]):
        want = classification.batch_classification(model, batch)
        got = classification.batch_classification(compiled, batch)
        assert [[p["index"] for p in row] for row in got] == [[p["index"] for p in row] for row in want]
        assert max(abs(g["score"] - w["score"]) for gr, wr in zip(got, want, strict=True)
                   for g, w in zip(gr, wr, strict=True)) <= 1e-3
    assert counters["stats"]["unique_graphs"] == 2  # serving compiled nothing new
