"""Image data written as text: ``data:`` URLs and bare base64, in a job's inputs and in
its result's ``output``, which :func:`output_items` turns into a list of such strings
or URLs to download."""

from __future__ import annotations

import base64
import binascii
import re

__all__ = [
    "INLINE_ON_LOOP",
    "b64decode_text",
    "decode_data_url",
    "decode_inline",
    "is_base64_image",
    "is_url",
    "output_items",
]

_URL = re.compile(r"https?://", re.IGNORECASE)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
#: Shortest bare base64 taken as image data; real images are far longer.
_MIN_B64_CHARS = 16
#: Characters read to find the first _MIN_B64_CHARS of base64 (line breaks allowed).
_HEAD_CHARS = 256
#: Base64 characters decoded in one call (a multiple of 4).
_PIECE = 1 << 20
#: Inline base64 longer than this (characters) is hashed, decoded and checked in a worker
#: thread; shorter (any URL) costs less than the hop and stays on the event loop.
INLINE_ON_LOOP = 64 * 1024


def output_items(output: object) -> list[str]:
    """Normalise the API's ``output`` into a non-empty list of strings.

    Accepts a string, a ``{"url": ...}`` / ``{"image": ...}`` mapping, or a list of
    either (the v2 shape for ``samples > 1`` and ``base64: true`` is not documented).
    """
    elements = output if isinstance(output, list) else [output]
    if not elements:
        raise ValueError("output is an empty list: the job returned no images")
    items = [_output_item(element, index) for index, element in enumerate(elements)]
    return items


def _output_item(element: object, index: int) -> str:
    value = element
    if isinstance(element, dict):
        value = next((element[key] for key in ("url", "image") if key in element), None)
        if value is None:
            keys = ", ".join(sorted(map(str, element))) or "none"
            raise ValueError(
                f"output[{index}] is an object without 'url' or 'image' (keys: {keys})"
            )
    if not isinstance(value, str):
        raise ValueError(
            f"output[{index}] is {type(value).__name__}, expected a URL or base64 string"
        )
    value = value.strip()
    if not value:
        raise ValueError(f"output[{index}] is an empty string")
    return value


def is_base64_image(text: str) -> bool:
    """True when ``text`` starts like bare base64 of an image: its first base64 characters
    decode to a known image signature. Only the head is read (the decode that follows
    checks the rest), so megabytes cost nothing here. The signature test is what keeps a
    path such as ``/data/face/img1`` (valid base64 alphabet) from being taken for data.
    """
    head = "".join(text[:_HEAD_CHARS].split())[:_MIN_B64_CHARS]
    if len(head) < _MIN_B64_CHARS or not _B64.fullmatch(head):
        return False
    return _has_image_signature(base64.b64decode(head))


def b64decode_text(text: str) -> bytes:
    """Standard base64 (whitespace allowed) to bytes; ``binascii.Error`` if it is not.

    Megabytes of it hold the GIL in each C call: whitespace goes by ``split`` (a regex
    over 11 MB takes 230 ms, ``split`` 14 ms) and the decode runs in 1 MiB pieces, so a
    worker thread doing this lets the event loop in every few milliseconds.
    """
    compact = "".join(text.split())
    if len(compact) <= _PIECE:
        return base64.b64decode(compact, validate=True)
    if len(compact) % 4:
        raise binascii.Error("Incorrect padding")
    pieces = range(0, len(compact), _PIECE)
    return b"".join(base64.b64decode(compact[i : i + _PIECE], validate=True) for i in pieces)


def _has_image_signature(head: bytes) -> bool:
    return (
        head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"\xff\xd8\xff")
        or head.startswith((b"GIF87a", b"GIF89a"))
        or (head.startswith(b"RIFF") and head[8:12] == b"WEBP")
        or head.startswith((b"II*\x00", b"MM\x00*"))
        or (head.startswith(b"BM") and head[6:10] == b"\0\0\0\0")  # reserved words
        or head[4:8] == b"ftyp"
    )


def is_url(text: str) -> bool:
    """Whether ``text`` is an http(s) URL (to download or fetch), not inline data."""
    return _URL.match(text) is not None


def decode_inline(item: str) -> bytes | None:
    """Decode inline image data; ``None`` for an http(s) URL to download instead.

    Inline data is a ``data:image/...;base64,`` URL or bare base64 whose bytes start
    with an image signature. Anything else (another scheme, a path, junk) is a
    ValueError. CPU-bound for large strings: call it from a worker thread.
    """
    text = item.strip()
    if is_url(text):
        return None
    if text[:5].lower() == "data:":
        return decode_data_url(text)
    if is_base64_image(text):
        return b64decode_text(text)
    if scheme := _SCHEME.match(text):
        raise ValueError(f"unsupported output scheme {scheme.group()!r}: {_preview(text)}")
    raise ValueError(f"output is neither an http(s) URL nor base64 image data: {_preview(text)}")


def decode_data_url(text: str) -> bytes:
    """The bytes of a ``data:`` URL: it must be base64 and of an image media type.

    Shared by outputs and inputs (a job's image parameters). The ValueError never
    quotes the payload: it can be megabytes, and inputs show it on the terminal.
    """
    header, comma, payload = text.partition(",")
    media_type, *params = header[5:].split(";")
    media_type = media_type.strip().lower()
    if not comma or "base64" not in (p.strip().lower() for p in params):
        raise ValueError("data URL is not base64-encoded (expected data:image/...;base64,...)")
    if not (media_type.startswith("image/") or media_type in ("", "application/octet-stream")):
        raise ValueError(f"data URL holds {_preview(media_type)}, not an image")
    try:
        data = b64decode_text(payload)
    except binascii.Error as exc:
        raise ValueError(f"data URL payload is not valid base64: {exc}") from None
    if not data:
        raise ValueError("data URL payload is empty")
    return data


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
