"""Real, deterministic output images: the same seed and parameters give the same bytes."""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from threading import Lock
from typing import Any

from PIL import Image, ImageDraw

from batcher.schemas import ModelSpec

#: Pillow's format name and the MIME type for each output format a model may ask for.
FORMATS: dict[str, tuple[str, str]] = {
    "png": ("PNG", "image/png"),
    "jpg": ("JPEG", "image/jpeg"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}


@dataclass(frozen=True)
class ImageRequest:
    """Everything that decides an output image's bytes."""

    width: int
    height: int
    fmt: str
    quality: int
    digest: str  # of model, resolved parameters, seed and sample index

    @property
    def mime(self) -> str:
        return FORMATS[self.fmt][1]


def image_request(
    model: ModelSpec,
    params: Mapping[str, Any],
    seed: int,
    index: int,
    size_override: tuple[int, int] | None = None,
) -> ImageRequest:
    """What image a job's ``index``-th sample is, from its resolved parameters."""
    out = model.output
    width = int(params.get(out.width_param or "", out.default_width))
    height = int(params.get(out.height_param or "", out.default_height))
    if size_override is not None:
        width, height = size_override
    fmt = str(params.get(out.format_param or "", out.default_format)).lower()
    if fmt not in FORMATS:
        fmt = out.default_format
    quality = int(params.get(out.quality_param or "", 85))
    # The base64 flag changes how the image travels, not the picture.
    drawn = {k: v for k, v in params.items() if k != out.base64_param}
    canon = json.dumps([model.slug, drawn, seed, index], sort_keys=True, default=str)
    digest = hashlib.sha256(canon.encode()).hexdigest()
    return ImageRequest(width, height, fmt, quality, digest)


def render(req: ImageRequest) -> bytes:
    """Encode the image (blocking: run it in a worker thread)."""
    d = bytes.fromhex(req.digest)
    img = Image.new("RGB", (req.width, req.height), (d[0], d[1], d[2]))
    draw = ImageDraw.Draw(img)
    w, h = req.width, req.height
    for k in range(4):
        x0, y0 = d[3 + k] * w // 256, d[7 + k] * h // 256
        x1, y1 = x0 + max(1, d[11 + k] * w // 512), y0 + max(1, d[15 + k] * h // 512)
        draw.ellipse((x0, y0, x1, y1), fill=(d[19 + k], d[23 + k], d[27 + k]))
    buf = io.BytesIO()
    pil_format = FORMATS[req.fmt][0]
    if pil_format == "PNG":
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, pil_format, quality=max(1, min(req.quality, 100)))
    return buf.getvalue()


class ImageCache:
    """A small LRU of encoded images, so repeated downloads cost no encoding."""

    def __init__(self, max_items: int = 256) -> None:
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._max = max_items
        self._lock = Lock()  # render() runs in worker threads

    def get_or_render(self, req: ImageRequest) -> bytes:
        with self._lock:
            data = self._items.get(req.digest)
            if data is not None:
                self._items.move_to_end(req.digest)
                return data
        data = render(req)
        with self._lock:
            self._items[req.digest] = data
            while len(self._items) > self._max:
                self._items.popitem(last=False)
        return data
