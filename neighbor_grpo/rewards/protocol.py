"""The reward-server protocol, `POST /v1/score`: what a batch to score and its reply look like on the wire.

Request (JSON):  {"protocol": 1, "encoding": "png" | "float32", "images": IMAGES, "prompts": [str, ...],
                  "source_images": IMAGES (optional, editing), "group_ids": [int, ...] (optional)}
  IMAGES, png:     a list of base64 PNGs, one per image (8-bit: values are rounded to k/255; interoperable)
  IMAGES, float32: {"shape": [batch, C, H, W], "data": base64 of the little-endian float32 array} (exact)
Reply (JSON):    {"protocol": 1, "scores": [float | null, ...], "metrics": {name: float} (optional)}
  null is a score the reward could not give (NaN or inf): the client's run skips that update, as for any reward.

Scores travel as JSON numbers: a float32 printed as the shortest float64 repr reads back to the same float32, so
with `encoding: float32` a run through a server equals the in-process run bit for bit (CPU). Every malformed field
is refused with one line naming it (`ProtocolError`).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Sequence

import numpy as np
import torch

PROTOCOL_VERSION = 1
ENCODINGS = ("png", "float32")


class ProtocolError(ValueError):
    """A request or reply that does not follow the protocol; the message names the field and what was expected."""


def png_bytes(image: torch.Tensor) -> bytes:
    from PIL import Image

    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_images(images: torch.Tensor, encoding: str):
    """(batch, C, H, W) in [0, 1] -> the wire form of `encoding` (C is 1 or 3 for PNG)."""
    if encoding == "png":
        if images.shape[1] not in (1, 3):
            raise ProtocolError(f"encoding 'png': images need 1 or 3 channels, got {images.shape[1]}; use float32")
        return [base64.b64encode(png_bytes(image)).decode("ascii") for image in images]
    if encoding == "float32":
        array = images.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
        return {"shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}
    raise ProtocolError(f"encoding: expected one of {list(ENCODINGS)}, got {encoding!r}")


def _b64(text: object, field: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"{field}: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{field}: not valid base64") from None


def decode_images(value: object, encoding: str, field: str) -> torch.Tensor:
    """The wire form -> float32 (batch, C, H, W) in [0, 1]; one line naming `field` for anything malformed."""
    if encoding == "float32":
        if not isinstance(value, dict) or set(value) != {"shape", "data"}:
            raise ProtocolError(f"{field}: expected {{'shape': [batch, C, H, W], 'data': base64 float32}} for "
                                "encoding float32")
        shape = value["shape"]
        if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(n, int) and n > 0 for n in shape)):
            raise ProtocolError(f"{field}.shape: expected 4 positive integers [batch, C, H, W], got {shape!r}")
        data = _b64(value["data"], f"{field}.data")
        if len(data) != 4 * math.prod(shape):
            raise ProtocolError(f"{field}.data: {len(data)} bytes, expected {4 * math.prod(shape)} for float32 "
                                f"of shape {shape}")
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32))
    if encoding != "png":
        raise ProtocolError(f"encoding: expected one of {list(ENCODINGS)}, got {encoding!r}")
    if not isinstance(value, list) or not value:
        raise ProtocolError(f"{field}: expected a non-empty list of base64 PNG strings for encoding png")
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for number, item in enumerate(value):
        try:
            with Image.open(io.BytesIO(_b64(item, f"{field}[{number}]"))) as image:
                image = image.convert("L" if image.mode in ("L", "1", "I;16") else "RGB")
                array = np.asarray(image, dtype=np.uint8)
        except (UnidentifiedImageError, OSError):
            raise ProtocolError(f"{field}[{number}]: not a readable PNG image") from None
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    if len({a.shape for a in arrays}) != 1:
        raise ProtocolError(f"{field}: the images differ in size or channels; send one size per request")
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).float() / 255.0


def encode_request(images: torch.Tensor, prompts: Sequence[str], encoding: str = "png",
                   source_images: torch.Tensor | None = None, group_ids: torch.Tensor | None = None) -> dict:
    body = {"protocol": PROTOCOL_VERSION, "encoding": encoding, "images": encode_images(images, encoding),
            "prompts": list(prompts)}
    if source_images is not None:
        body["source_images"] = encode_images(source_images, encoding)
    if group_ids is not None:
        body["group_ids"] = [int(g) for g in group_ids]
    return body


def decode_request(body: object) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
    """A request body -> (images, prompts, {source_images, group_ids} as given)."""
    if not isinstance(body, dict):
        raise ProtocolError(f"request: expected a JSON object, got {type(body).__name__}")
    check_version(body.get("protocol"), "request")
    encoding = body.get("encoding", "png")
    images = decode_images(body.get("images"), encoding, "images")
    prompts = body.get("prompts")
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)) or len(prompts) != len(images):
        raise ProtocolError(f"prompts: expected a list of {len(images)} strings, one per image")
    inputs = {}
    if body.get("source_images") is not None:
        inputs["source_images"] = decode_images(body["source_images"], encoding, "source_images")
        if inputs["source_images"].shape[0] != len(images):
            raise ProtocolError(f"source_images: expected {len(images)} images, one per image")
    if body.get("group_ids") is not None:
        ids = body["group_ids"]
        if not (isinstance(ids, list) and len(ids) == len(images)
                and all(isinstance(g, int) and not isinstance(g, bool) for g in ids)):
            raise ProtocolError(f"group_ids: expected a list of {len(images)} integers, one per image")
        inputs["group_ids"] = torch.tensor(ids, dtype=torch.int64)
    return images, prompts, inputs


def check_version(version: object, what: str) -> None:
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{what}.protocol: expected {PROTOCOL_VERSION}, got {version!r}")


def encode_reply(scores: torch.Tensor, metrics: dict[str, float] | None = None) -> dict:
    """Scores as JSON numbers (exact for float32), null for NaN/inf."""
    values = [float(s) if math.isfinite(float(s)) else None for s in scores.detach().float().cpu()]
    reply = {"protocol": PROTOCOL_VERSION, "scores": values}
    if metrics:
        reply["metrics"] = {str(k): float(v) for k, v in metrics.items()}
    return reply


def decode_reply(body: object, count: int) -> tuple[torch.Tensor, dict[str, float]]:
    """A reply -> (scores float32 (count,), with NaN for null; metrics)."""
    if not isinstance(body, dict):
        raise ProtocolError(f"reply: expected a JSON object, got {type(body).__name__}")
    check_version(body.get("protocol"), "reply")
    scores = body.get("scores")
    if not isinstance(scores, list) or len(scores) != count:
        got = f"{len(scores)} values" if isinstance(scores, list) else type(scores).__name__
        raise ProtocolError(f"scores: expected a list of {count} numbers (one per image), got {got}")
    bad = [i for i, s in enumerate(scores) if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)))]
    if bad:
        raise ProtocolError(f"scores[{bad[0]}]: expected a number or null, got {scores[bad[0]]!r}")
    metrics = body.get("metrics") or {}
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise ProtocolError("metrics: expected an object of numbers")
    values = torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float64)
    return values.float(), {str(k): float(v) for k, v in metrics.items()}
