"""Joint image/mask transforms for segmentation training and evaluation.

Training (``augment`` given), in this order, following the CIRKD protocol (``spec/losses.md``):

1. normalise: ``x = (pixel - mean) / std`` with ``mean`` and ``std`` in **0-255 pixel units**
   (``std = [1, 1, 1]`` gives CIRKD's mean-subtraction-only normalisation);
2. random scale ``s ~ U(scale_range)``: image bilinear, mask nearest;
3. pad bottom/right up to ``crop_size``: image with 0 (= the mean colour, since this is after
   normalisation), mask with ``ignore_index``;
4. random crop to ``crop_size = (h, w)``;
5. random horizontal flip with p = 0.5 (if ``flip``).

Evaluation (``augment=None``): normalise only, whole image.

Randomness comes only from torch (``torch.rand`` / ``torch.randint``), from the ``generator`` passed
to the call or else torch's global generator, which a DataLoader seeds per worker -- so a run with a
fixed seed replays the same augmentations.  Output: image float32 ``3 x H x W``, mask int64 ``H x W``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_tensors(image, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``H x W x 3`` image and integer ``H x W`` mask (numpy or torch) -> float 3xHxW, int64 HxW."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(_writable(image))
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(_writable(mask))
    return image.permute(2, 0, 1).float(), mask.long()


def _writable(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable array (read-only memory maps are copied; torch wants to own them)."""
    return a if a.flags.c_contiguous and a.flags.writeable else np.array(a, order="C")


def normalize(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(image - mean) / std`` per channel, image ``3 x H x W`` in 0-255 units."""
    return (image - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


def random_scale(image, mask, scale_range: Sequence[float], generator=None):
    """Resize by ``s ~ U(lo, hi)``: bilinear for the image, nearest for the mask."""
    lo, hi = float(scale_range[0]), float(scale_range[1])
    s = lo + (hi - lo) * torch.rand((), generator=generator).item()
    h, w = mask.shape
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if size == (h, w):
        return image, mask
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    # nearest-exact: pixel centres line up with bilinear(align_corners=False); plain 'nearest' shifts.
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, mask


def pad_to(image, mask, size: Sequence[int], ignore_index: int):
    """Pad bottom/right to at least ``size``: image with 0, mask with ``ignore_index``."""
    h, w = mask.shape
    ph, pw = max(int(size[0]) - h, 0), max(int(size[1]) - w, 0)
    if ph == 0 and pw == 0:
        return image, mask
    image = F.pad(image, (0, pw, 0, ph), value=0.0)
    mask = F.pad(mask, (0, pw, 0, ph), value=ignore_index)
    return image, mask


def random_crop(image, mask, size: Sequence[int], generator=None):
    """A ``size`` window at a uniformly random position (the inputs must be at least that large)."""
    ch, cw = int(size[0]), int(size[1])
    h, w = mask.shape
    top = int(torch.randint(0, h - ch + 1, (), generator=generator))
    left = int(torch.randint(0, w - cw + 1, (), generator=generator))
    return image[:, top : top + ch, left : left + cw], mask[top : top + ch, left : left + cw]


def random_hflip(image, mask, p: float = 0.5, generator=None):
    """Mirror both left-right with probability ``p``."""
    if torch.rand((), generator=generator).item() < p:
        return image.flip(-1), mask.flip(-1)
    return image, mask


class SegTransform:
    """Callable ``(image, mask, generator=None) -> (float 3xHxW, int64 HxW)``; see the module docstring.

    ``augment`` is ``None`` (evaluation) or ``{"crop_size": [h, w], "scale_range": [lo, hi],
    "flip": bool}``.
    """

    def __init__(self, mean, std, ignore_index: int = 255, augment: dict | None = None):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        if self.mean.shape != (3,) or self.std.shape != (3,):
            raise ValueError(f"mean and std need 3 values each, got {list(mean)} and {list(std)}")
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.ignore_index = int(ignore_index)
        self.augment = None
        if augment is not None:
            unknown = set(augment) - {"crop_size", "scale_range", "flip"}
            if unknown:
                raise ValueError(f"unknown augment keys {sorted(unknown)}; valid: crop_size, scale_range, flip")
            crop = [int(v) for v in augment["crop_size"]]
            scale = [float(v) for v in augment.get("scale_range", (1.0, 1.0))]
            if len(crop) != 2 or min(crop) < 1:
                raise ValueError(f"crop_size must be [h, w] with positive values, got {augment['crop_size']}")
            if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
                raise ValueError(f"scale_range must be [lo, hi] with 0 < lo <= hi, got {augment.get('scale_range')}")
            self.augment = {"crop_size": crop, "scale_range": scale, "flip": bool(augment.get("flip", False))}

    def __call__(self, image, mask, generator: torch.Generator | None = None):
        image, mask = to_tensors(image, mask)
        image = normalize(image, self.mean, self.std)
        if self.augment is None:
            return image.contiguous(), mask.contiguous()
        a = self.augment
        image, mask = random_scale(image, mask, a["scale_range"], generator)
        image, mask = pad_to(image, mask, a["crop_size"], self.ignore_index)
        image, mask = random_crop(image, mask, a["crop_size"], generator)
        if a["flip"]:
            image, mask = random_hflip(image, mask, 0.5, generator)
        return image.contiguous(), mask.contiguous()

    def __repr__(self):
        return f"SegTransform(mean={self.mean.tolist()}, std={self.std.tolist()}, augment={self.augment})"
