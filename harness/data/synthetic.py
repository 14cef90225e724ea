"""``synthetic``: procedurally generated street scenes, the harness's embedded default dataset.

Nothing is shipped or downloaded.  Image ``index`` of split ``split`` under dataset ``seed`` is drawn
from ``np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))`` (numpy only),
so every image is a pure function of those three numbers, the image size and
:data:`GENERATOR_VERSION`.  ``train``, ``tune`` and ``val`` come from the same generator and scene
distribution; each has its own split id, hence its own seed streams, so they never share an image
whatever their sizes.  ``tune`` is the held-out part of the training distribution used to choose
hyperparameters, ``val`` is for reporting.

Scene model (a camera 1.5 m above a flat street, looking along it)
-------------------------------------------------------------------
Pixel ``d`` rows below the horizon lies ``Z = f * 1.5 / d`` metres away and spans ``1.5 / d``
metres, so an object standing there is ``d / 1.5`` pixels per metre tall: every object is scaled by
the distance of its foot to the horizon, and objects are drawn far-to-near (painter's algorithm), so
occlusion follows depth.  Back to front:

* **sky** (4) above a horizon whose height varies per image; blue with clouds, or overcast grey;
* **vegetation** (3) as grass / park behind the street and tree lines in the gaps between
  **buildings** (2), flat facades along the skyline with random heights and a random window grid,
  with hedges along their base;
* **road** (0), a perspective trapezoid with dashed centre / solid edge lane markings, flanked by
  **sidewalks** (1) with a curb and paving tiles; a cast shadow may fall across the street;
* objects, depth-sorted: **cars** (8) on the road (rear view in the lanes, side view parked at the
  curb), **persons** (7) on the sidewalk (a few crossing the road), **poles** (5) at the curb with a
  **traffic sign** (6) on most of them, **trees** (3) on the sidewalk, and void clutter on the ground;
* sometimes the bonnet of the recording car at the bottom, void like in Cityscapes.  Void pixels
  are labelled ignore (255), about 1 % of all pixels;
* global illumination, contrast, colour cast and gamma, optional blur and additive pixel noise.
  Masks stay sharp: every label is a hard region, only the image is blurred and noised.

Why distillation is a real question here
-----------------------------------------
Pixel frequencies are long-tailed like Cityscapes: road, building and sky cover ~72 % of the
labelled pixels, car, vegetation and sidewalk another ~25 %, while pole (~0.75 %), traffic sign
(~0.35 %) and person (~1.3 %) are rare, small and thin.  Colours overlap on purpose: road, sidewalk, building, pole and a third of the cars are drawn
from the same grey/brown ranges, sky can be as grey as a facade, vegetation can be olive or brown,
car, sign and clothing colours are random, and a global photometric change moves all of them
together.  Colour alone does not solve it: the Bayes-optimal per-pixel lookup on a 16^3 RGB
histogram fitted to 400 train images gets 19 % val mIoU (33 % with the image row added), and 0 IoU
on pole.  A model must use shape (thin poles, sign silhouettes, car and person outlines), texture
(window grids, lane markings, paving, foliage) and context (signs sit on poles, persons on the
sidewalk, cars on the road and larger near the bottom).  A small student gets the stuff classes
quickly and loses mIoU on the rare thin classes -- which is where a larger teacher's soft labels and
features (class relations, boundaries, long-range context) can help, or not.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import SegTransform

# Bump whenever the drawing code changes what an (seed, split, index) renders to: it is part of the
# cache key, so stale cached splits are never reused.
GENERATOR_VERSION = 1

CLASS_NAMES = (
    "road",
    "sidewalk",
    "building",
    "vegetation",
    "sky",
    "pole",
    "traffic sign",
    "person",
    "car",
)
NUM_CLASSES = len(CLASS_NAMES)
# Cityscapes colours of the same classes.
PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (107, 142, 35),
    (70, 130, 180),
    (153, 153, 153),
    (220, 220, 0),
    (220, 20, 60),
    (0, 0, 142),
)
IGNORE_INDEX = 255
SPLIT_IDS = {"train": 0, "tune": 1, "val": 2}

ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, POLE, SIGN, PERSON, CAR = range(NUM_CLASSES)

CAMERA_HEIGHT = 1.5  # metres; pixels per metre at a foot d rows below the horizon = d / CAMERA_HEIGHT


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image; distinct for every (seed, split, index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_IDS[split], int(index)]))


def render(seed: int, split: str, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of ``split``: (uint8 image H x W x 3, uint8 mask H x W, 255 = ignore)."""
    return render_scene(scene_rng(seed, split, index), height, width)


def render_split(seed: int, split: str, size: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """All images of a split: (uint8 N x H x W x 3, uint8 N x H x W)."""
    images = np.empty((size, height, width, 3), np.uint8)
    masks = np.empty((size, height, width), np.uint8)
    for i in range(size):
        images[i], masks[i] = render(seed, split, i, height, width)
    return images, masks


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one street scene from ``rng``; see the module docstring for the scene model."""
    c = _Canvas.new(rng, height, width)
    layout = _sample_layout(rng, c)
    _draw_sky(rng, c, layout)
    _draw_background_greenery(rng, c, layout)
    _draw_buildings(rng, c, layout)
    _draw_hedges(rng, c, layout)
    _draw_street(rng, c, layout)
    _draw_cast_shadow(rng, c, layout)
    for foot_y, draw, kwargs in sorted(_sample_objects(rng, c, layout), key=lambda o: o[0]):
        draw(rng, c, layout, foot_y, **kwargs)
    _draw_ego_hood(rng, c)
    return _photometric(rng, c), c.mask


# --------------------------------------------------------------------------------------------------
# Canvas, layout and drawing helpers
# --------------------------------------------------------------------------------------------------


@dataclass
class _Canvas:
    h: int
    w: int
    img: np.ndarray  # float32 3 x H x W (channel-first: fast masked writes), 0..255
    mask: np.ndarray  # uint8 H x W
    yy: np.ndarray  # float32 H x 1 pixel-centre rows
    xx: np.ndarray  # float32 1 x W pixel-centre columns
    # value-noise fields (H x W, std ~0.5) at four random frequencies, the raw material of textures
    coarse: np.ndarray  # illumination, clouds
    mid: np.ndarray  # facades, grass, ragged hedge and clutter outlines
    fine: np.ndarray  # foliage, paving, object surfaces
    grain: np.ndarray  # asphalt

    @classmethod
    def new(cls, rng, h, w):
        s = min(h, w)
        return cls(
            h=h,
            w=w,
            img=np.zeros((3, h, w), np.float32),
            mask=np.full((h, w), SKY, np.uint8),
            yy=np.arange(h, dtype=np.float32)[:, None] + 0.5,
            xx=np.arange(w, dtype=np.float32)[None, :] + 0.5,
            coarse=_value_noise(rng, h, w, s * rng.uniform(0.25, 0.5)),
            mid=_value_noise(rng, h, w, s * rng.uniform(0.04, 0.12)),
            fine=_value_noise(rng, h, w, s * rng.uniform(0.015, 0.03)),
            grain=_value_noise(rng, h, w, s * rng.uniform(0.01, 0.025)),
        )


@dataclass
class _Layout:
    horizon: float  # row of the horizon (pixels)
    vx: float  # column of the vanishing point
    focal: float  # focal length in pixels (depth Z = focal * CAMERA_HEIGHT / d)
    road_half: float  # metres from the road centre to each curb
    walk_left: float  # sidewalk widths (metres)
    walk_right: float

    def ppm(self, foot_y):
        """Pixels per metre for an object whose foot is at row ``foot_y``."""
        return max(foot_y - self.horizon, 1e-3) / CAMERA_HEIGHT

    def column(self, lateral, foot_y):
        """Image column of a ground point ``lateral`` metres right of the road centre."""
        return self.vx + lateral * self.ppm(foot_y)


def _sample_layout(rng, c: _Canvas) -> _Layout:
    return _Layout(
        horizon=c.h * rng.uniform(0.32, 0.52),
        vx=c.w * rng.uniform(0.3, 0.7),
        focal=c.w * rng.uniform(0.8, 1.2),
        road_half=rng.uniform(1.6, 3.2),
        walk_left=rng.uniform(2.5, 5.0),
        walk_right=rng.uniform(2.5, 5.0),
    )


def _value_noise(rng, h, w, cell):
    """Smooth random field (smoothstep-interpolated Gaussian grid, spacing ``cell`` px), std ~0.5."""
    cell = max(float(cell), 1.0)
    grid = rng.standard_normal((int(h / cell) + 3, int(w / cell) + 3)).astype(np.float32) * 0.6
    rows = _interp_weights(h, cell, rng.uniform(0, 1))
    cols = _interp_weights(w, cell, rng.uniform(0, 1))
    along_x = grid[:, cols[0]] * cols[2] + grid[:, cols[1]] * cols[3]  # grid rows x w
    return along_x[rows[0]] * rows[2][:, None] + along_x[rows[1]] * rows[3][:, None]


def _interp_weights(n, cell, offset):
    t = np.arange(n, dtype=np.float32) / np.float32(cell) + np.float32(offset)
    i0 = t.astype(np.int64)
    f = t - i0
    f = f * f * (3 - 2 * f)  # smoothstep
    return i0, i0 + 1, 1 - f, f


@dataclass
class _Box:
    """A clipped image window with its local pixel-centre coordinates."""

    sl: tuple[slice, slice]
    yy: np.ndarray
    xx: np.ndarray


def _box(c: _Canvas, y0, y1, x0, x1) -> _Box | None:
    ys0, ys1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), c.h)
    xs0, xs1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), c.w)
    if ys0 >= ys1 or xs0 >= xs1:
        return None
    return _Box((slice(ys0, ys1), slice(xs0, xs1)), c.yy[ys0:ys1], c.xx[:, xs0:xs1])


def _paint(c: _Canvas, box: _Box | None, region, label, colour, texture=None, amp=0.0):
    """Write ``label`` into the mask and ``colour`` (RGB, optionally x (1 + amp*texture)) into the
    image, inside ``region`` (a boolean array of the box's shape; None = the whole box)."""
    if box is None:
        return
    colour = np.asarray(colour, np.float32).reshape(3, 1, 1)
    if texture is not None and amp:
        colour = colour * (1.0 + np.float32(amp) * texture[box.sl])
    if region is None:
        c.img[(slice(None), *box.sl)] = colour
        c.mask[box.sl] = label
    else:
        np.copyto(c.img[(slice(None), *box.sl)], colour, where=region)
        np.copyto(c.mask[box.sl], label, where=region, casting="unsafe")


def _shade(c: _Canvas, box: _Box, region, gain):
    """Multiply the image (not the mask) by ``gain`` (scalar or field) inside ``region``."""
    c.img[(slice(None), *box.sl)] *= np.where(region, np.float32(1.0) * gain, np.float32(1.0))


def _ellipse(box: _Box, cy, cx, ry, rx):
    return ((box.yy - cy) / max(ry, 0.5)) ** 2 + ((box.xx - cx) / max(rx, 0.5)) ** 2 <= 1.0


def _rect(box: _Box, y0, y1, x0, x1):
    """Pixels whose centre lies in [y0, y1) x [x0, x1); at least one pixel wide/high if in view."""
    if y1 - y0 < 1:
        y0, y1 = (y0 + y1) / 2 - 0.5, (y0 + y1) / 2 + 0.5
    if x1 - x0 < 1:
        x0, x1 = (x0 + x1) / 2 - 0.5, (x0 + x1) / 2 + 0.5
    return (box.yy >= y0) & (box.yy < y1) & (box.xx >= x0) & (box.xx < x1)


# Colour pools.  They overlap between classes on purpose (see the module docstring).


def _coin(rng):
    """-1.0 or +1.0 with equal probability (left or right, facing one way or the other)."""
    return 1.0 if rng.random() < 0.5 else -1.0


def _rgb(rng, lo, hi):
    """A colour drawn uniformly from the box [lo, hi] (per channel)."""
    lo = np.asarray(lo, np.float64)
    return lo + (np.asarray(hi, np.float64) - lo) * rng.random(3)


def _neutral(rng, lo, hi):
    """A grey with a random warm or cool tint: shared by road, sidewalk, building, pole, car."""
    v = rng.uniform(lo, hi)
    return v + _rgb(rng, (-10, -8, -22), (22, 10, 12))


def _warm(rng, lo, hi):
    """Brick / beige / brown: buildings and pavers, close to olive vegetation and dark cars."""
    v = rng.uniform(lo, hi)
    return v * _rgb(rng, (1.0, 0.72, 0.5), (1.25, 0.95, 0.8))


def _random_colour(rng):
    if rng.random() < 0.35:
        return _neutral(rng, 20, 230)
    return rng.uniform(15, 240, size=3)


def _foliage(rng):
    if rng.random() < 0.2:  # autumn / olive / dry
        return _rgb(rng, (80, 70, 25), (150, 125, 70))
    return _rgb(rng, (25, 55, 10), (100, 150, 80))


# --------------------------------------------------------------------------------------------------
# Scene elements, back to front
# --------------------------------------------------------------------------------------------------


def _full(c: _Canvas) -> _Box:
    return _Box((slice(0, c.h), slice(0, c.w)), c.yy, c.xx)


def _draw_sky(rng, c: _Canvas, lay: _Layout):
    """Vertical gradient (blue or overcast grey) with clouds from the coarse noise field."""
    if rng.random() < 0.35:  # overcast: as grey as a facade or the road
        top = np.full(3, rng.uniform(120, 225)) + rng.uniform(-8, 8, 3)
        bottom = top + rng.uniform(0, 25)
    else:
        top = _rgb(rng, (40, 90, 150), (120, 170, 240))
        bottom = top + _rgb(rng, (40, 30, 5), (110, 80, 20))
    t = np.clip(c.yy / max(lay.horizon, 1.0), 0, 1)  # H x 1
    clouds = np.clip(c.coarse * np.float32(rng.uniform(0.5, 1.6)), 0, 1) * np.float32(rng.uniform(0, 0.8))
    white = np.float32(rng.uniform(200, 250))
    for k in range(3):
        c.img[k] = (top[k] * (1 - t) + bottom[k] * t) * (1 - clouds) + white * clouds
    c.mask[:] = SKY


def _draw_background_greenery(rng, c: _Canvas, lay: _Layout):
    """Grass below the horizon and a tree line just above it (seen through gaps between buildings)."""
    ground = np.broadcast_to(c.yy >= lay.horizon, (c.h, c.w))
    _paint(c, _full(c), ground, VEGETATION, _foliage(rng), c.mid, rng.uniform(0.1, 0.3))
    if rng.random() < 0.7:
        ridge = lay.horizon - c.h * rng.uniform(0.03, 0.12) * (1 + 0.8 * c.mid[0:1, :])
        trees = (c.yy >= ridge) & ~ground
        _paint(c, _full(c), trees, VEGETATION, _foliage(rng), c.fine, rng.uniform(0.25, 0.5))


def _draw_buildings(rng, c: _Canvas, lay: _Layout):
    """Flat facades side by side along the skyline, each reaching down to the ground."""
    x = -rng.uniform(0, 0.2) * c.w
    while x < c.w:
        width = c.w * rng.uniform(0.12, 0.45)
        if rng.random() < 0.85:  # otherwise a gap showing sky and trees
            height = lay.horizon * rng.uniform(0.15, 1.15)
            _draw_facade(rng, c, lay.horizon - height, x, x + width)
        x += width


def _draw_facade(rng, c: _Canvas, top, x0, x1):
    box = _box(c, top, c.h, x0, x1)
    if box is None:
        return
    colour = _warm(rng, 60, 210) if rng.random() < 0.4 else _neutral(rng, 40, 210)
    _paint(c, box, None, BUILDING, colour, c.mid, rng.uniform(0.05, 0.2))
    if rng.random() < 0.85:  # window grid with random period, size and glass colour
        py, px = c.h * rng.uniform(0.04, 0.11), c.w * rng.uniform(0.035, 0.1)
        fy, fx = rng.uniform(0.35, 0.7), rng.uniform(0.3, 0.7)
        oy, ox = rng.uniform(0, py), rng.uniform(0, px)
        windows = (((box.yy - top - oy) % py) < fy * py) & (((box.xx - x0 - ox) % px) < fx * px)
        windows &= box.yy > top + 0.5 * py
        if rng.random() < 0.7:
            glass = colour * rng.uniform(0.3, 0.75)
        else:  # reflecting the sky
            glass = _rgb(rng, (60, 80, 100), (150, 180, 220))
        _paint(c, box, windows, BUILDING, glass, c.fine, 0.1)


def _ground_coords(c: _Canvas, lay: _Layout):
    """(rows below the horizon d, lateral metres X, depth metres Z), broadcastable to H x W."""
    d = c.yy - lay.horizon
    dpos = np.maximum(d, 1e-3)
    lateral = (c.xx - lay.vx) * (CAMERA_HEIGHT / dpos)
    depth = lay.focal * CAMERA_HEIGHT / dpos
    return d, lateral, depth


def _draw_hedges(rng, c: _Canvas, lay: _Layout):
    """Hedges or bushes along the back of a sidewalk, h metres tall, in front of the facades."""
    d, _, _ = _ground_coords(c, lay)
    for side, walk in ((-1.0, lay.walk_left), (1.0, lay.walk_right)):
        if rng.random() < 0.55:
            continue
        back = lay.road_half + walk  # lateral position of the facade line
        base = np.maximum((c.xx - lay.vx) * side, 0) * (CAMERA_HEIGHT / back)  # rows below horizon
        height = rng.uniform(0.5, 2.2)
        hedge = (base > 0) & (d < base) & (d > base * (1 - height / CAMERA_HEIGHT))
        hedge &= c.mid * rng.uniform(0.3, 1.0) > -0.35  # ragged, with gaps
        _paint(c, _full(c), hedge, VEGETATION, _foliage(rng), c.fine, rng.uniform(0.3, 0.6))


def _draw_street(rng, c: _Canvas, lay: _Layout):
    """Road trapezoid with lane markings, sidewalks with a curb and paving tiles."""
    d, lateral, depth = _ground_coords(c, lay)
    below, box = d > 0, _full(c)

    walk = below & (lateral > -lay.road_half - lay.walk_left) & (lateral < lay.road_half + lay.walk_right)
    walk_colour = _warm(rng, 90, 190) if rng.random() < 0.3 else _neutral(rng, 75, 185)
    _paint(c, box, walk, SIDEWALK, walk_colour, c.fine, rng.uniform(0.05, 0.2))
    tile = rng.uniform(0.5, 1.2)
    joints = walk & ((((lateral + 50) / tile) % 1 < 0.08) | ((depth / tile) % 1 < 0.08))
    _paint(c, box, joints, SIDEWALK, walk_colour * rng.uniform(0.7, 0.9))
    curb = walk & (np.abs(lateral) < lay.road_half + rng.uniform(0.15, 0.3))
    _paint(c, box, curb, SIDEWALK, walk_colour * rng.uniform(0.8, 1.25))

    road = below & (np.abs(lateral) < lay.road_half)
    _paint(c, box, road, ROAD, _neutral(rng, 50, 140), c.grain, rng.uniform(0.08, 0.25))
    if rng.random() < 0.8:
        paint = _rgb(rng, (200, 200, 200), (245, 245, 245))
    else:  # yellow
        paint = _rgb(rng, (200, 170, 30), (240, 210, 90))
    line_w = rng.uniform(0.08, 0.15)
    centre = rng.uniform(-0.3, 0.3) * lay.road_half
    dash = rng.uniform(3, 9)
    dashed = (np.abs(lateral - centre) < line_w) & (((depth / dash) + rng.uniform(0, 1)) % 1 < 0.5)
    _paint(c, box, road & dashed, ROAD, paint * rng.uniform(0.6, 1.0), c.grain, 0.1)
    if rng.random() < 0.5:
        edges = np.abs(np.abs(lateral) - (lay.road_half - 0.35)) < line_w
        _paint(c, box, road & edges, ROAD, paint * rng.uniform(0.6, 1.0), c.grain, 0.1)


def _draw_cast_shadow(rng, c: _Canvas, lay: _Layout):
    """A building's shadow: darken everything on one side of a random slanted line (colour only)."""
    if rng.random() < 0.4:
        return
    x0 = c.w * rng.uniform(0, 1)
    slope = rng.uniform(-2.5, 2.5)
    side = _coin(rng)
    top = lay.horizon - c.h * rng.uniform(0, 0.3)
    region = ((c.xx - x0 - slope * (c.yy - lay.horizon)) * side > 0) & (c.yy > top)
    _shade(c, _full(c), region, 1 - rng.uniform(0.3, 0.6) * (1 + 0.3 * c.coarse))


# Objects. Each sampler returns (foot row, draw function, kwargs); drawn far (small row) to near.


def _sample_objects(rng, c: _Canvas, lay: _Layout):
    ground_rows = c.h - lay.horizon
    objects = []

    def foot(lo, hi):
        """A foot row, log-uniform in its distance below the horizon (more far objects than near)."""
        return lay.horizon + ground_rows * np.exp(rng.uniform(np.log(lo), np.log(hi)))

    def on_walk(lo_frac, hi_frac):
        side = _coin(rng)
        width = lay.walk_right if side > 0 else lay.walk_left
        return side * (lay.road_half + width * rng.uniform(lo_frac, hi_frac))

    for _ in range(rng.poisson(1.3)):  # cars in the lanes, seen from behind
        lateral = rng.uniform(-1, 1) * max(lay.road_half - 1.0, 0.2)
        objects.append((foot(0.1, 0.85), _draw_car_rear, {"lateral": lateral}))
    for _ in range(rng.poisson(0.8)):  # parked cars, side view, at the curb
        side = _coin(rng)
        lateral = side * (lay.road_half - rng.uniform(0.9, 1.2))
        objects.append((foot(0.1, 0.7), _draw_car_side, {"lateral": lateral}))
    for _ in range(rng.poisson(4.0)):  # pedestrians, a few of them crossing the road
        lateral = on_walk(0.2, 0.9) if rng.random() < 0.9 else rng.uniform(-1, 1) * lay.road_half
        objects.append((foot(0.12, 1.0), _draw_person, {"lateral": lateral}))
    for _ in range(rng.poisson(2.5)):
        sign = rng.random() < 0.6
        objects.append((foot(0.06, 0.8), _draw_pole, {"lateral": on_walk(0.05, 0.25), "sign": sign}))
    for _ in range(rng.poisson(2.5)):
        objects.append((foot(0.05, 0.8), _draw_tree, {"lateral": on_walk(0.5, 1.0)}))
    for _ in range(rng.poisson(1.5)):  # void clutter (bins, bags, unlabelled stuff) on the ground
        lateral = _coin(rng) * (lay.road_half + rng.uniform(-0.8, 2.0))
        objects.append((foot(0.05, 0.9), _draw_clutter, {"lateral": lateral}))
    return objects


def _draw_car_rear(rng, c: _Canvas, lay: _Layout, foot_y, lateral):
    p = lay.ppm(foot_y)
    xc = lay.column(lateral, foot_y)
    w, body_top, roof = 1.8 * p, foot_y - 1.0 * p, foot_y - 1.5 * p
    box = _box(c, roof, foot_y, xc - w / 2, xc + w / 2)
    if box is None:
        return
    body = _rect(box, body_top, foot_y - 0.2 * p, xc - w / 2, xc + w / 2)
    taper = (box.yy - roof) / max(body_top - roof, 1e-3) * 0.12 * p  # cabin wider at the bottom
    cabin = _rect(box, roof, body_top, xc - w / 2, xc + w / 2) & (np.abs(box.xx - xc) < 0.36 * w + taper)
    hull = body | cabin
    _paint(c, box, hull, CAR, _random_colour(rng), c.fine, 0.05)
    _shade(c, box, hull, 1.15 - 0.3 * (box.yy - roof) / max(1.5 * p, 1.0))  # lit roof, dark sill
    glass = cabin & (box.yy > roof + 0.08 * p) & (np.abs(box.xx - xc) < 0.33 * w + taper - 0.06 * p)
    _paint(c, box, glass, CAR, rng.uniform(20, 70, 3))
    wheels = _rect(box, foot_y - 0.35 * p, foot_y, xc - w / 2 + 0.05 * p, xc + w / 2 - 0.05 * p)
    wheels &= np.abs(box.xx - xc) > 0.35 * w
    _paint(c, box, wheels, CAR, np.full(3, rng.uniform(10, 40)))
    lights = _rect(box, body_top + 0.1 * p, body_top + 0.25 * p, xc - w / 2, xc + w / 2)
    lights &= np.abs(box.xx - xc) > 0.38 * w
    _paint(c, box, lights, CAR, _rgb(rng, (150, 10, 10), (240, 60, 50)))


def _draw_car_side(rng, c: _Canvas, lay: _Layout, foot_y, lateral):
    p = lay.ppm(foot_y)
    xc = lay.column(lateral, foot_y)
    length = 4.3 * p
    box = _box(c, foot_y - 1.5 * p, foot_y, xc - length / 2, xc + length / 2)
    if box is None:
        return
    body = _rect(box, foot_y - 1.0 * p, foot_y - 0.25 * p, xc - length / 2, xc + length / 2)
    cab_c = xc - _coin(rng) * 0.25 * p
    slant = (box.yy - (foot_y - 1.5 * p)) / (0.5 * p)  # 0 at the roof, 1 at the body top
    cabin = _rect(box, foot_y - 1.5 * p, foot_y - 1.0 * p, xc - length / 2, xc + length / 2)
    cabin &= np.abs(box.xx - cab_c) < (1.1 + 0.5 * slant) * p
    _paint(c, box, body | cabin, CAR, _random_colour(rng), c.fine, 0.06)
    glass = cabin & (box.yy > foot_y - 1.42 * p) & (np.abs(box.xx - cab_c) < (0.9 + 0.5 * slant) * p)
    _paint(c, box, glass, CAR, rng.uniform(20, 80, 3))
    tyre = np.full(3, rng.uniform(10, 40))
    for wx in (xc - 1.4 * p, xc + 1.4 * p):
        _paint(c, box, _ellipse(box, foot_y - 0.33 * p, wx, 0.33 * p, 0.33 * p), CAR, tyre)


def _draw_person(rng, c: _Canvas, lay: _Layout, foot_y, lateral):
    p = lay.ppm(foot_y) * rng.uniform(0.9, 1.1)
    xc = lay.column(lateral, foot_y)
    box = _box(c, foot_y - 1.8 * p, foot_y, xc - 0.4 * p, xc + 0.4 * p)
    if box is None:
        return
    stride = rng.uniform(0, 0.15) * p
    legs = _rect(box, foot_y - 0.85 * p, foot_y, xc - 0.17 * p - stride, xc + 0.17 * p + stride)
    legs &= (np.abs(box.xx - xc) > 0.03 * p) | (box.yy < foot_y - 0.7 * p)
    torso = _rect(box, foot_y - 1.45 * p, foot_y - 0.8 * p, xc - 0.23 * p, xc + 0.23 * p)
    head = _ellipse(box, foot_y - 1.58 * p, xc, 0.13 * p, 0.1 * p)
    _paint(c, box, legs, PERSON, _random_colour(rng) * 0.7, c.fine, 0.1)
    _paint(c, box, torso, PERSON, _random_colour(rng), c.fine, 0.15)
    _paint(c, box, head, PERSON, _rgb(rng, (90, 60, 40), (240, 200, 170)), c.fine, 0.05)


def _draw_pole(rng, c: _Canvas, lay: _Layout, foot_y, lateral, sign):
    p = lay.ppm(foot_y)
    xc = lay.column(lateral, foot_y)
    top = foot_y - rng.uniform(2.8, 5.0) * p
    half = rng.uniform(0.05, 0.1) * p
    box = _box(c, top - 0.7 * p, foot_y, xc - 0.5 * p - 1, xc + 0.5 * p + 1)
    if box is None:
        return
    shaft = _rect(box, top, foot_y, xc - half, xc + half)
    _paint(c, box, shaft, POLE, _neutral(rng, 35, 175), c.fine, 0.05)
    if sign:
        _draw_sign(rng, c, box, top, xc, rng.uniform(0.3, 0.5) * p)


_SIGN_COLOURS = np.array([[200, 30, 30], [30, 70, 180], [230, 200, 30], [230, 230, 230]], np.float32)


def _draw_sign(rng, c: _Canvas, box: _Box, top, xc, r):
    """A round, square, triangular or diamond plate of radius ``r`` hanging from the pole top."""
    cy = top + r * 0.9
    dy, dx = box.yy - cy, box.xx - xc
    shape = rng.integers(4)
    if shape == 0:
        plate = dy**2 + dx**2 <= r**2
    elif shape == 1:
        plate = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    elif shape == 2:
        plate = (dy <= 0.6 * r) & (dy >= -r + 1.6 * np.abs(dx))
    else:
        plate = np.abs(dy) + np.abs(dx) <= 1.2 * r
    plate = plate | ((np.abs(dy) <= 0.5) & (np.abs(dx) <= 0.5))  # at least one pixel when tiny
    if rng.random() < 0.5:
        face = _random_colour(rng)
    else:
        face = _SIGN_COLOURS[rng.integers(len(_SIGN_COLOURS))] + rng.uniform(-25, 25, 3)
    _paint(c, box, plate, SIGN, face, c.fine, 0.05)
    if r > 2.5:  # an inner symbol / ring
        _paint(c, box, plate & (dy**2 + dx**2 <= (0.55 * r) ** 2), SIGN, _random_colour(rng))


def _draw_tree(rng, c: _Canvas, lay: _Layout, foot_y, lateral):
    p = lay.ppm(foot_y)
    xc = lay.column(lateral, foot_y)
    trunk_h, crown_r = rng.uniform(1.5, 3.5) * p, rng.uniform(1.4, 3.0) * p
    crown_y = foot_y - trunk_h - crown_r * 0.6
    box = _box(c, crown_y - 1.8 * crown_r, foot_y, xc - 1.8 * crown_r, xc + 1.8 * crown_r)
    if box is None:
        return
    trunk = _rect(box, foot_y - trunk_h - crown_r * 0.3, foot_y, xc - 0.12 * p, xc + 0.12 * p)
    _paint(c, box, trunk, VEGETATION, _warm(rng, 50, 120), c.fine, 0.1)
    distance = np.inf  # to the nearest of 1-3 overlapping lobes, in lobe radii (squared)
    for _ in range(rng.integers(1, 4)):
        oy, ox = rng.uniform(-0.4, 0.4, 2) * crown_r
        ry, rx = rng.uniform(0.55, 0.9, 2) * crown_r
        distance = np.minimum(distance, ((box.yy - crown_y - oy) / ry) ** 2 + ((box.xx - xc - ox) / rx) ** 2)
    crown = distance <= 1 + rng.uniform(0.4, 0.9) * c.fine[box.sl]  # a ragged, leafy outline
    _paint(c, box, crown, VEGETATION, _foliage(rng), c.fine, rng.uniform(0.3, 0.6))


def _draw_clutter(rng, c: _Canvas, lay: _Layout, foot_y, lateral):
    """Unlabelled junk: an irregular blob of random texture, marked ignore (255)."""
    p = lay.ppm(foot_y)
    xc = lay.column(lateral, foot_y)
    ry, rx = rng.uniform(0.2, 0.6) * p, rng.uniform(0.2, 0.7) * p
    box = _box(c, foot_y - 2 * ry, foot_y, xc - rx, xc + rx)
    if box is None:
        return
    blob = _ellipse(box, foot_y - ry, xc, ry, rx) & (c.mid[box.sl] > rng.uniform(-0.6, 0.0))
    _paint(c, box, blob, IGNORE_INDEX, _random_colour(rng), c.grain, rng.uniform(0.2, 0.6))


def _draw_ego_hood(rng, c: _Canvas):
    """Sometimes the bonnet of the recording car shows at the bottom; void (255) like in Cityscapes."""
    if rng.random() > 0.2:
        return
    rise = c.h * rng.uniform(0.02, 0.06)
    u = (c.xx - c.w * rng.uniform(0.4, 0.6)) / (0.8 * c.w)
    hood = c.yy > c.h - rise * (1 - u * u)
    _paint(c, _full(c), hood, IGNORE_INDEX, _neutral(rng, 10, 120), c.coarse, 0.3)


# --------------------------------------------------------------------------------------------------
# Camera
# --------------------------------------------------------------------------------------------------


def _photometric(rng, c: _Canvas) -> np.ndarray:
    """Uneven illumination, contrast, exposure, colour cast, blur, pixel noise, gamma -> uint8 HxWx3."""
    img = c.img
    img *= 1 + np.float32(rng.uniform(0, 0.25)) * c.coarse
    mean = img.mean()
    contrast = rng.uniform(0.7, 1.3)
    gain = rng.uniform(0.6, 1.3) * rng.uniform(0.88, 1.12, 3)  # exposure x colour cast
    # (img - mean) * contrast + mean, then x gain: one multiply-add per pixel
    img *= (contrast * gain).astype(np.float32)[:, None, None]
    img += (mean * (1 - contrast) * gain).astype(np.float32)[:, None, None]
    if rng.random() < 0.5:
        img = _blur3(img)
    sigma = rng.uniform(2, 9)  # uniform sensor noise with this standard deviation
    noise = np.frombuffer(rng.bytes(img.size), np.uint8).reshape(img.shape)
    img += noise * np.float32(sigma / 73.9) - np.float32(127.5 * sigma / 73.9 - 0.5)  # +0.5: rounding
    quantised = np.clip(img, 0, 255, out=img).astype(np.uint8)
    tone = 255.0 * (np.arange(256) / 255.0) ** rng.uniform(0.8, 1.25)  # gamma, as a lookup table
    return np.take(np.round(tone).astype(np.uint8), quantised.transpose(1, 2, 0))


def _blur3(img):
    """Separable [1, 2, 1] / 4 blur of a C x H x W image with edge replication."""
    for axis in (1, 2):
        out = img * np.float32(0.5)
        first, rest = [slice(None)] * 3, [slice(None)] * 3
        first[axis], rest[axis] = slice(None, -1), slice(1, None)
        out[tuple(rest)] += np.float32(0.25) * img[tuple(first)]  # neighbour before
        out[tuple(first)] += np.float32(0.25) * img[tuple(rest)]  # neighbour after
        edge0, edge1 = [slice(None)] * 3, [slice(None)] * 3
        edge0[axis], edge1[axis] = slice(0, 1), slice(-1, None)
        out[tuple(edge0)] += np.float32(0.25) * img[tuple(edge0)]
        out[tuple(edge1)] += np.float32(0.25) * img[tuple(edge1)]
        img = out
    return img


# --------------------------------------------------------------------------------------------------
# Dataset and on-disk cache
# --------------------------------------------------------------------------------------------------

# The config group conf/dataset/synthetic.yaml is this dict.  mean/std (0-255 units) were measured
# on the 1500 train images of seed 0 at 96 x 96 with GENERATOR_VERSION 1.
DEFAULT_CONFIG = {
    "name": "synthetic",
    "num_classes": NUM_CLASSES,
    "ignore_index": IGNORE_INDEX,
    "image_size": [96, 96],
    "sizes": {"train": 1500, "tune": 200, "val": 200},
    "seed": 0,
    "mean": [98.56, 98.48, 93.74],
    "std": [54.4, 53.89, 60.29],
    "class_names": list(CLASS_NAMES),
}


class SyntheticStreets(Dataset):
    """The ``synthetic`` dataset: ``ds[i] -> (float32 3 x H x W image, int64 H x W mask)``.

    ``cfg`` is the dataset config dict (missing keys default to :data:`DEFAULT_CONFIG`), ``augment``
    the training augmentation (``None`` = evaluation, see :mod:`harness.data.transforms`).  With a
    ``cache_dir`` the whole split is generated once and shared through ``.npy`` files.
    """

    CLASS_NAMES = CLASS_NAMES
    PALETTE = PALETTE
    SPLITS = tuple(SPLIT_IDS)

    def __init__(self, cfg: dict, split: str, augment: dict | None = None, cache_dir: str | None = None):
        cfg = {**DEFAULT_CONFIG, **cfg}
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown split {split!r} for dataset 'synthetic'; valid: {', '.join(SPLIT_IDS)}")
        if split not in cfg["sizes"]:
            raise ValueError(f"dataset 'synthetic': cfg 'sizes' has no entry for split {split!r}")
        self.split = split
        self.size = int(cfg["sizes"][split])
        self.height, self.width = (int(v) for v in cfg["image_size"])
        self.seed = int(cfg["seed"])
        if self.size < 0 or self.height < 8 or self.width < 8:
            raise ValueError(f"dataset 'synthetic': bad size {self.size} or image_size {cfg['image_size']}")
        self.num_classes = NUM_CLASSES
        self.ignore_index = int(cfg["ignore_index"])
        if 0 <= self.ignore_index < NUM_CLASSES:
            raise ValueError(f"ignore_index {self.ignore_index} collides with a class id (0..{NUM_CLASSES - 1})")
        self.class_names = list(CLASS_NAMES)
        self.palette = [tuple(rgb) for rgb in PALETTE]
        self.transform = SegTransform(cfg["mean"], cfg["std"], self.ignore_index, augment)
        self.generator: torch.Generator | None = None  # augmentation RNG; None = torch's global one
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self._images, self._masks = load_split(self.seed, split, self.size, self.height, self.width, self.cache_dir)
        self._frequencies = None

    def __len__(self) -> int:
        return self.size

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored uint8 image (H x W x 3) and mask (H x W, 255 = ignore) of ``index``."""
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for split {self.split!r} of size {self.size}")
        return self._images[index], self._masks[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.raw(index)
        mask = torch.from_numpy(np.array(mask, dtype=np.int64))
        if self.ignore_index != IGNORE_INDEX:
            mask[mask == IGNORE_INDEX] = self.ignore_index
        return self.transform(image, mask, self.generator)

    def class_frequencies(self) -> np.ndarray:
        """Fraction of the split's labelled pixels in each class (ignore excluded); sums to 1."""
        if self._frequencies is None:
            counts = np.zeros(256, np.int64)
            for start in range(0, self.size, 256):
                counts += np.bincount(np.asarray(self._masks[start : start + 256]).ravel(), minlength=256)
            labelled = counts[:NUM_CLASSES].astype(np.float64)
            self._frequencies = labelled / max(labelled.sum(), 1.0)
        return self._frequencies.copy()

    def __getstate__(self):
        # DataLoader workers started by spawn re-open the cache files instead of receiving a copy.
        state = self.__dict__.copy()
        if self.cache_dir is not None:
            state["_images"] = state["_masks"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._images is None:
            self._images, self._masks = load_split(
                self.seed, self.split, self.size, self.height, self.width, self.cache_dir
            )

    def __repr__(self):
        return (
            f"SyntheticStreets(split={self.split!r}, size={self.size}, image_size=({self.height}, {self.width}), "
            f"seed={self.seed}, augment={self.transform.augment})"
        )


def generation_params(seed: int, split: str, size: int, height: int, width: int) -> dict:
    """Everything that determines a split's pixels: the cache key is a hash of this."""
    return {
        "dataset": "synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "split": split,
        "split_id": SPLIT_IDS[split],
        "size": int(size),
        "image_size": [int(height), int(width)],
    }


def cache_paths(cache_dir: str, params: dict) -> tuple[str, str]:
    """``<cache_dir>/synthetic-<hash>-<split>-{images,masks}.npy``."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    stem = os.path.join(cache_dir, f"synthetic-{digest}-{params['split']}")
    return stem + "-images.npy", stem + "-masks.npy"


def load_split(seed, split, size, height, width, cache_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (images N x H x W x 3, masks N x H x W) of a split: from the cache, else generated.

    Without ``cache_dir`` the split lives in memory (shared by the datasets of this process).  With
    it, a missing or unreadable cache is generated and written atomically (temp file in the same
    folder, then ``os.replace``), so processes racing on the same split only ever see whole files;
    generation is deterministic, so whichever writer wins, the content is the same.
    """
    if cache_dir is None or size == 0:
        return _generate_in_memory(int(seed), split, int(size), int(height), int(width))
    images_path, masks_path = cache_paths(cache_dir, generation_params(seed, split, size, height, width))
    cached = _load_cached(images_path, masks_path, (size, height, width))
    if cached is not None:
        return cached
    images, masks = render_split(seed, split, size, height, width)
    os.makedirs(cache_dir, exist_ok=True)
    _save_atomic(masks_path, masks)
    _save_atomic(images_path, images)
    return _read_only(images), _read_only(masks)


@functools.lru_cache(maxsize=4)
def _generate_in_memory(seed, split, size, height, width):
    images, masks = render_split(seed, split, size, height, width)
    return _read_only(images), _read_only(masks)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _load_cached(images_path, masks_path, shape):
    """Memory-mapped cached arrays, or None if missing, truncated or of the wrong shape."""
    try:
        images = np.load(images_path, mmap_mode="r")
        masks = np.load(masks_path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return None
    if images.shape != (*shape, 3) or masks.shape != shape or images.dtype != np.uint8 or masks.dtype != np.uint8:
        return None
    return images, masks


def _save_atomic(path: str, array: np.ndarray) -> None:
    """``np.save`` to a temp file next to ``path``, then rename it over ``path`` in one step."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
