"""Host-side image preprocessing for streamed data: decode, crop, resize; uint8 out.

Train: an Inception-style random-resized crop (area and aspect-ratio ranges, 10 tries,
then a centre crop of the whole image with the ratio clipped into range, as torchvision
does). Eval: the centre crop that resizing the shorter side to `size / crop_fraction`
and cropping `size` would take, resized to `size` in one step. A JPEG is decoded at
1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when the crop still covers `size` pixels
at that scale, so large images cost a fraction of a full decode.

Every random draw comes from the `rng` passed in, which the caller derives from
(seed, step, global example position): never from a per-process or per-worker counter.
Normalisation (mean/std) happens on the device; uint8 leaves the host.

numpy and OpenCV only: runs in input worker processes, which never touch JAX.
"""

import dataclasses
import io
import math

import cv2
import numpy as np

from flaxtrain.errors import UserError

cv2.setNumThreads(1)  # Parallelism comes from input workers and threads, not from OpenCV.

_REDUCED = {
  1: None,
  2: cv2.IMREAD_REDUCED_COLOR_2,
  4: cv2.IMREAD_REDUCED_COLOR_4,
  8: cv2.IMREAD_REDUCED_COLOR_8,
}
_REDUCED_GRAY = {
  1: None,
  2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
  4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
  8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


class DecodeError(ValueError):
  """An image's bytes could not be decoded."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """What the host does to one encoded image.

  size: output side in pixels, or None to keep a fixed-size dataset's own images as
  they are (no crop, no resize). channels: 1 or 3.
  """

  size: int | None
  channels: int
  train: bool
  random_resized_crop: bool = False
  area_range: tuple[float, float] = (0.08, 1.0)
  aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
  crop_fraction: float = 0.875

  def __call__(self, data: bytes, rng: np.random.Generator | None) -> np.ndarray:
    if self.size is None:
      return decode(data, self.channels)
    h, w = header_size(data)
    if self.train and self.random_resized_crop:
      box = random_resized_crop_box(rng, h, w, self.area_range, self.aspect_range)
    else:
      box = center_crop_box(h, w, self.crop_fraction)
    return decode_crop_resize(data, box, self.size, self.channels, (h, w))


# JPEG start-of-frame markers (baseline, progressive, ...): they carry the image size.
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) from a JPEG's start-of-frame segment; None if not found."""
  i, n = 2, len(data)
  while i + 9 <= n:
    if data[i] != 0xFF:
      return None
    marker = data[i + 1]
    if marker == 0xFF:  # Fill byte.
      i += 1
      continue
    if marker in _SOF:
      return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
    if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # No length field.
      i += 2
      continue
    i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
  return None


def header_size(data: bytes) -> tuple[int, int]:
  """(height, width) from the image header, without decoding the pixels."""
  if data[:2] == b"\xff\xd8" and (hw := _jpeg_size(data)) and min(hw) > 0:
    return hw  # ~15x faster than asking PIL.
  from PIL import Image  # Reads only the header here.

  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
  except Exception as e:  # PIL raises many kinds for bad bytes.
    raise DecodeError(f"unreadable image header ({type(e).__name__})") from e
  return h, w


def decode(data: bytes, channels: int, scale: int = 1) -> np.ndarray:
  """Encoded bytes -> uint8 [H, W, channels] (RGB), at 1/scale size for JPEGs."""
  buf = np.frombuffer(data, np.uint8)
  if channels == 1:
    flag = _REDUCED_GRAY[scale] if scale > 1 else cv2.IMREAD_GRAYSCALE
  else:
    flag = _REDUCED[scale] if scale > 1 else cv2.IMREAD_COLOR
  # Pixels as stored, as TensorFlow decodes them: EXIF orientation is not applied.
  try:
    image = cv2.imdecode(buf, flag | cv2.IMREAD_IGNORE_ORIENTATION)
  except cv2.error as e:
    raise DecodeError(f"OpenCV: {' '.join(str(e).split())[:120]}") from e
  if image is None:
    raise DecodeError("the bytes are not a decodable image")
  if channels == 1:
    return image[:, :, None]
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def random_resized_crop_box(
  rng: np.random.Generator, h: int, w: int, area_range, aspect_range, attempts: int = 10
) -> tuple[int, int, int, int]:
  """(y, x, height, width) of an Inception-style crop: random area and log-uniform ratio."""
  area = h * w
  log_ratio = (math.log(aspect_range[0]), math.log(aspect_range[1]))
  for _ in range(attempts):
    target = area * rng.uniform(*area_range)
    ratio = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * ratio)))
    ch = int(round(math.sqrt(target / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      y = int(rng.integers(0, h - ch + 1))
      x = int(rng.integers(0, w - cw + 1))
      return y, x, ch, cw
  # Fallback: the whole image, its ratio clipped into the range, centred.
  ratio = w / h
  if ratio < aspect_range[0]:
    cw, ch = w, int(round(w / aspect_range[0]))
  elif ratio > aspect_range[1]:
    ch, cw = h, int(round(h * aspect_range[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def center_crop_box(h: int, w: int, crop_fraction: float) -> tuple[int, int, int, int]:
  """The square centre crop that 'resize the shorter side, then crop' takes."""
  side = max(1, int(round(min(h, w) * crop_fraction)))
  return (h - side) // 2, (w - side) // 2, side, side


def decode_crop_resize(data: bytes, box, size: int, channels: int, hw) -> np.ndarray:
  """Decodes (at a reduced scale where the crop allows it), crops `box`, resizes to size^2."""
  y, x, ch, cw = box
  scale = 1
  if data[:2] == b"\xff\xd8":  # JPEG: libjpeg can decode at 1/2, 1/4, 1/8 scale.
    while scale < 8 and min(ch, cw) // (2 * scale) >= size:
      scale *= 2
  image = decode(data, channels, scale)
  if scale > 1:  # Map the box onto the reduced image (its sides are ceil(side / scale)).
    y, x = y // scale, x // scale
    ch, cw = max(1, ch // scale), max(1, cw // scale)
  h, w = image.shape[:2]
  if scale == 1 and (h, w) != tuple(hw):
    raise DecodeError(f"the header says {hw[0]}x{hw[1]} but the pixels are {h}x{w}")
  crop = image[y : y + ch, x : x + cw]
  if crop.shape[:2] != (size, size):
    # Bicubic, as the Flax ImageNet example resizes; area averaging (4x slower) only where
    # shrinking by over 2x would alias, which the reduced-scale decode mostly leaves to
    # images that are not JPEGs.
    far = min(crop.shape[:2]) > 2 * size
    crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if far else cv2.INTER_CUBIC)
    if channels == 1:
      crop = crop[:, :, None]
  return np.ascontiguousarray(crop)


def check_sizes(image_size, area_range, aspect_range, crop_fraction) -> None:
  """One-sentence errors for impossible preprocessing settings."""
  if image_size is not None and (
    not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0
  ):
    raise UserError(
      f"dataset.image_size must be a positive integer (pixels), got "
      f"{image_size!r}: set --config.dataset.image_size, e.g. 224."
    )
  lo, hi = area_range
  if not 0 < lo <= hi <= 1:
    raise UserError(
      f"augment.crop_area_range must satisfy 0 < low <= high <= 1, got "
      f"{tuple(area_range)}: e.g. --config.augment.crop_area_range='(0.08, 1.0)'."
    )
  lo, hi = aspect_range
  if not 0 < lo <= hi:
    raise UserError(
      f"augment.crop_aspect_range must satisfy 0 < low <= high, got "
      f"{tuple(aspect_range)}: e.g. --config.augment.crop_aspect_range="
      "'(0.75, 1.333)'."
    )
  if not 0 < crop_fraction <= 1:
    raise UserError(
      f"dataset.eval_crop_fraction must be in (0, 1], got {crop_fraction}: e.g. 0.875."
    )
