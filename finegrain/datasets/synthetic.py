"""Synthetic fine-grained video benchmark, written in the Something-Something-v2 layout.

No video dataset can be downloaded here, so this benchmark is every command's embedded default:
short clips of simple objects whose classes come in confusable groups (pairs or triples) that
differ only subtly, half of the groups in *time* (the same scene played in another direction or
order: left→right vs right→left, clockwise vs anticlockwise, falling off vs stopping at the edge)
and half in *space* (the same motion with a small change of appearance: a notched corner, a spill
in the last frames, two close shades). Distractors make the rest of a clip uninformative: textured
backgrounds, a table, clutter objects, camera jitter, brightness noise, random speed, start
position and clip length (24-64 frames).

Layout (that of SSv2, so the SSv2 reader reads it with no special case)::

    DIR/videos/{id}.mp4      H.264, via finegrain.datasets.encode.write_mp4
    DIR/labels.json          {"Moving something from left to right": "0", ...}
    DIR/train.json           [{"id": "7", "label": "moving red disc from left to right",
    DIR/validation.json        "template": "Moving [something] from left to right",
                               "placeholders": ["red disc"]}, ...]
    DIR/classes.json         {name: {"index", "group", "subtlety", "template", "description"}}
    DIR/evidence.json        {id: {"height": H, "width": W, "part": [box | null per frame],
                               "object": [box | null per frame], "visible": [0 | 1 per frame]}}
    DIR/generated.json       the options and counts; written last, it marks DIR complete

Ground truth (``evidence.json``), per frame of every video, in the pixel coordinates of the
rendered frame (camera jitter included): a box is ``[x0, y0, x1, y1]`` (x to the right, y down,
right and bottom edges exclusive like a slice; clipped to the frame, rounded outwards to 0.1 px,
grown by the half pixel of anti-aliasing, so it holds every pixel the shape touches), null where
nothing of it is in the frame. ``object`` is the main (moving) object (the container with its
liquid for the fill scene; null while fully hidden behind the panel). ``part`` is what tells the
class from the others of its group: the notch's corner (the same, intact corner in the plain
class), the dots, the spill over the brim or the brim reached, the whole object for the shades,
the overlap of mover and panel for occlusion, and the moving object (the lid for open / close)
for the temporal groups. ``visible`` is 1 in the frames that show the difference: every frame
for the static appearance differences (notch, dots, shade), the frames of motion for direction
classes, the last frames (from the edge on; from the brim on) for push outcome and fill level,
the overlap frames for occlusion; 0 where ``part`` is null. The pretraining classes have
``object`` only (``part`` null, ``visible`` 0).

A class's name is its template with the brackets removed (the SSv2 rule). The class pairs that a
horizontal flip swaps are named with left/right ("... from left to right" <-> "... from right to
left"; "Turning something to the right" (clockwise) <-> "... to the left"), so the flip swap map
pairs them; every other class is drawn facing either way at random, so a flip leaves it unchanged.

Each video is rendered by its own generator seeded from (seed, video index): the output is
byte-identical for a seed, whatever the number of worker processes.
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing as mp
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finegrain.datasets.encode import write_mp4

__all__ = [
    "CLASSES",
    "DEFAULT_CLASSES",
    "EVIDENCE",
    "KINDS",
    "PRETRAIN_CLASSES",
    "GROUPS",
    "MARKER",
    "MAX_FRAMES",
    "MIN_FRAMES",
    "SynthClass",
    "ensure_synthetic",
    "generate",
    "render",
]

GENERATOR_VERSION = 1  # bump when a change alters the pixels, so ensure_synthetic regenerates
MARKER = "generated.json"
EVIDENCE = "evidence.json"
MIN_FRAMES, MAX_FRAMES = 24, 64
DEFAULT_CLASSES = 12


@dataclass(frozen=True)
class SynthClass:
    """One class: an SSv2 template, its confusable group and how it differs within the group."""

    template: str
    group: str
    subtlety: str  # "spatial" | "temporal"
    scene: str  # renderer in _SCENES
    variant: str
    description: str

    @property
    def name(self) -> str:
        """The SSv2 class name: the template with the brackets removed."""
        return self.template.replace("[", "").replace("]", "")


def _group(group: str, subtlety: str, scene: str, *members: tuple[str, str, str]):
    return [SynthClass(t, group, subtlety, scene, v, d) for t, v, d in members]


# The fixed order of the groups: `classes=K` takes the first K classes. Groups alternate temporal
# and spatial, so any prefix that ends on a group boundary is balanced (the default, 12, is).
GROUPS: tuple[tuple[SynthClass, ...], ...] = tuple(
    tuple(g)
    for g in (
        _group(
            "slide-direction",
            "temporal",
            "slide",
            ("Moving [something] from left to right", "ltr", "slides left to right"),
            ("Moving [something] from right to left", "rtl", "slides right to left"),
        ),
        _group(
            "corner-notch",
            "spatial",
            "notch",
            ("Sliding [something] with square corners", "plain", "a plain square slides"),
            (
                "Sliding [something] with a notched corner",
                "notch",
                "the same square with a small notch cut from one corner slides",
            ),
        ),
        _group(
            "rotation-direction",
            "temporal",
            "rotate",
            ("Turning [something] to the right", "cw", "a bar with an end marker turns clockwise"),
            ("Turning [something] to the left", "ccw", "the bar turns anticlockwise"),
        ),
        _group(
            "fill-level",
            "spatial",
            "fill",
            (
                "Pouring [something] into [something] up to the brim",
                "brim",
                "a container fills exactly to its brim",
            ),
            (
                "Pouring [something] into [something] until it overflows",
                "overflow",
                "the container fills and spills over its walls in the last frames",
            ),
        ),
        _group(
            "push-outcome",
            "temporal",
            "push",
            (
                "Pushing [something] so that it falls off the table",
                "falls",
                "an object slides to the table's edge and falls off",
            ),
            (
                "Pushing [something] so that it almost falls off but doesn't",
                "stops",
                "the object slides and stops at the very edge",
            ),
        ),
        _group(
            "shade",
            "spatial",
            "drop",
            ("Dropping a crimson [something]", "crimson", "a crimson (bluish red) object drops"),
            ("Dropping a scarlet [something]", "scarlet", "a scarlet (orange red) object drops"),
        ),
        _group(
            "vertical-motion",
            "temporal",
            "vertical",
            ("Moving [something] up", "up", "moves up"),
            ("Moving [something] down", "down", "moves down"),
            ("Moving [something] up and then down", "updown", "moves up and back down"),
        ),
        _group(
            "dot-count",
            "spatial",
            "dots",
            ("Shaking [something] with one dot on it", "1", "a square with one dot shakes"),
            ("Shaking [something] with two dots on it", "2", "the square has two dots"),
            ("Shaking [something] with three dots on it", "3", "the square has three dots"),
        ),
        _group(
            "lid",
            "temporal",
            "lid",
            ("Opening [something]", "open", "a box's lid swings open"),
            ("Closing [something]", "close", "the lid swings shut"),
        ),
        _group(
            "occlusion",
            "spatial",
            "occlude",
            (
                "Moving [something] behind [something]",
                "behind",
                "an object passes behind a static one",
            ),
            (
                "Moving [something] in front of [something]",
                "front",
                "the object passes in front of it",
            ),
        ),
    )
)
CLASSES: tuple[SynthClass, ...] = tuple(c for g in GROUPS for c in g)

# The pretraining set (the analogue of Kinetics / ImageNet for the fine-grained benchmark):
# coarse classes, a shape (the group) times a motion, drawn by the same renderer (backgrounds,
# clutter, camera jitter, noise). Its own scene and templates: no pretraining class is, or is
# confusable in the benchmark's sense with, a fine-grained class, whatever `classes` either set
# uses (checked below).
_COARSE_SHAPES = ("disc", "square", "diamond", "ring")
_COARSE_MOTIONS = {
    "drift": "drifting across the scene",
    "orbit": "circling around a point",
    "bounce": "bouncing up and down",
    "pulse": "growing and shrinking in place",
}
PRETRAIN_CLASSES: tuple[SynthClass, ...] = tuple(
    SynthClass(
        f"A {shape} {phrase}",
        shape,
        "coarse",
        "coarse",
        f"{shape}-{motion}",
        f"a {shape} {phrase}",
    )
    for motion, phrase in _COARSE_MOTIONS.items()
    for shape in _COARSE_SHAPES
)
KINDS = {"finegrained": CLASSES, "pretrain": PRETRAIN_CLASSES}
if {c.template for c in CLASSES} & {c.template for c in PRETRAIN_CLASSES} or {
    c.scene for c in CLASSES
} & {c.scene for c in PRETRAIN_CLASSES}:
    raise AssertionError("the pretraining classes must be disjoint from the benchmark's")


# --- drawing ---------------------------------------------------------------------------------
# Hand-written anti-aliased signed-distance shapes: PIL's ImageDraw has neither anti-aliasing nor
# sub-pixel positions, which small objects moving a fraction of a pixel per frame need (a notch of
# 3 px must not flicker). A shape's coverage of a pixel is clip(0.5 - signed distance, 0, 1).


def _box(x, y, cx, cy, hw, hh, angle=0.0):
    """Signed distance (px) to a box of half sizes (hw, hh) at (cx, cy), turned by ``angle``
    (radians; positive is clockwise on screen, where y points down)."""
    dx, dy = x - cx, y - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, c * dy - s * dx
    qx, qy = np.abs(dx) - hw, np.abs(dy) - hh
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _disc(x, y, cx, cy, r):
    return np.hypot(x - cx, y - cy) - r


def _rot(angle: float, u: float, v: float) -> tuple[float, float]:
    """(u, v) in an object's frame → screen offset, for an object turned by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    return c * u - s * v, s * u + c * v


class _Frame:
    """One float frame being drawn; ``x, y`` are the world coordinates of its pixel centres."""

    def __init__(self, img: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        self.img, self.x, self.y = img, x, y

    def paint(self, sdf: np.ndarray, color) -> None:
        """Blend ``color`` over the frame by the shape's anti-aliased coverage."""
        a = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
        self.img += a * (np.asarray(color, np.float32) - self.img)

    def shape(self, kind: str, cx, cy, h, color, angle=0.0) -> None:
        """A solid square, disc or diamond of half size ``h``."""
        if kind == "disc":
            self.paint(_disc(self.x, self.y, cx, cy, h), color)
        elif kind == "diamond":
            self.paint(_box(self.x, self.y, cx, cy, 0.8 * h, 0.8 * h, angle + math.pi / 4), color)
        else:
            self.paint(_box(self.x, self.y, cx, cy, h, h, angle), color)


_HUES = ((15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (195, "cyan"))
_HUES += ((255, "blue"), (290, "purple"), (335, "pink"), (361, "red"))
_NOUNS = {"square": "block", "disc": "ball", "diamond": "diamond"}


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb((h % 360) / 360, s, v)
    return 255 * r, 255 * g, 255 * b


def _vivid(rng: np.random.Generator, hue: float | None = None):
    """A saturated colour and its name (the objects of interest)."""
    hue = rng.uniform(0, 360) if hue is None else hue
    name = next(n for limit, n in _HUES if hue % 360 < limit)
    return _hsv(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)), name


def _muted(rng: np.random.Generator, lo: float = 0.3, hi: float = 0.7):
    """A greyish colour (backgrounds, tables, clutter)."""
    return _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.35), rng.uniform(lo, hi))


# --- scenes ----------------------------------------------------------------------------------


@dataclass
class _Scene:
    rng: np.random.Generator
    size: int
    frames: int
    table: tuple[float, float, float] | None = None  # (top y, x from, x to) in world px

    @property
    def unit(self) -> float:
        """Pixels per unit of the 64 px design."""
        return self.size / 64

    def window(self, lo: float = 0.55, hi: float = 0.8, tail: float = 0.0) -> tuple[float, float]:
        """(start, duration) in frames of the main motion: random speed and start time;
        ``tail`` (a fraction of the clip) stays free after it."""
        span = self.frames - 1
        dur = self.rng.uniform(lo, hi) * span
        return self.rng.uniform(0, max(0.0, span * (1 - tail) - dur)), dur

    def full_table(self, lo: float = 0.72, hi: float = 0.86) -> float:
        top = self.rng.uniform(lo, hi) * self.size
        self.table = (top, -1e9, 1e9)
        return top


Draw = Callable[[_Frame, int], None]

# --- ground truth ------------------------------------------------------------------------------
# Each scene also returns ``evidence(t) -> (part, object, visible)``: the boxes (x0, y0, x1, y1,
# world px, exclusive right/bottom edge) of the discriminative part and of the main object in
# frame t (None where not drawn) and whether the difference from the group's other classes shows
# in frame t. Derived from the same numbers the scene draws with, and drawing no random numbers,
# so the pixels do not depend on it. A shape covers the pixels whose centre is less than half a
# pixel from it (the anti-aliasing of _Frame.paint): its box is its extent grown by _AA.

Box = tuple[float, float, float, float]
Evidence = Callable[[int], tuple[Box | None, Box | None, bool]]
_AA = 0.5


def _rect_bounds(cx, cy, hw, hh, angle=0.0, pad=_AA) -> Box:
    """Box of a ``_box`` of half sizes (hw, hh) turned by ``angle``, grown by ``pad``."""
    c, s = abs(math.cos(angle)), abs(math.sin(angle))
    ex, ey = c * hw + s * hh + pad, s * hw + c * hh + pad
    return cx - ex, cy - ey, cx + ex, cy + ey


def _disc_bounds(cx, cy, r) -> Box:
    return cx - r - _AA, cy - r - _AA, cx + r + _AA, cy + r + _AA


def _shape_bounds(kind: str, cx, cy, h, angle=0.0) -> Box:
    """Box of ``_Frame.shape(kind, cx, cy, h, angle=angle)``."""
    if kind == "disc":
        return _disc_bounds(cx, cy, h)
    if kind == "diamond":
        return _rect_bounds(cx, cy, 0.8 * h, 0.8 * h, angle + math.pi / 4)
    return _rect_bounds(cx, cy, h, h, angle)


def _local_bounds(cx, cy, angle, u0, u1, v0, v1) -> Box:
    """Box of the rectangle [u0, u1] x [v0, v1] in the frame of an object at (cx, cy) turned
    by ``angle`` (``_rot``'s convention)."""
    corners = [_rot(angle, u, v) for u in (u0, u1) for v in (v0, v1)]
    xs, ys = [cx + p[0] for p in corners], [cy + p[1] for p in corners]
    return min(xs), min(ys), max(xs), max(ys)


def _union(*boxes: Box | None) -> Box | None:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _intersection(a: Box | None, b: Box | None) -> Box | None:
    if a is None or b is None:
        return None
    box = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return box if box[0] < box[2] and box[1] < box[3] else None


def _moving(t: int, start: float, dur: float) -> bool:
    """Whether a motion over [start, start + dur] moves the object into or out of frame t (its
    position in frame t differs from that in frame t - 1 or t + 1)."""
    return start - 1 < t < start + dur + 1


def _frame_box(box: Box | None, jx: int, jy: int, size: int) -> list[float] | None:
    """World box → the rendered frame's pixel coordinates (camera offset (jx, jy)), clipped to
    the frame and rounded outwards to 0.1 px; None when nothing of it is in the frame."""
    if box is None:
        return None
    x0, y0 = max(0.0, box[0] - jx), max(0.0, box[1] - jy)
    x1, y1 = min(float(size), box[2] - jx), min(float(size), box[3] - jy)
    if x1 <= x0 or y1 <= y0:
        return None
    lo = [math.floor(v * 10 + 1e-6) / 10 for v in (x0, y0)]
    hi = [math.ceil(v * 10 - 1e-6) / 10 for v in (x1, y1)]
    return [round(lo[0], 1), round(lo[1], 1), round(hi[0], 1), round(hi[1], 1)]


def _progress(t: float, start: float, dur: float, ease: bool = True) -> float:
    s = min(1.0, max(0.0, (t - start) / dur))
    return s * s * (3 - 2 * s) if ease else s


def _scene_slide(sc: _Scene, variant: str) -> tuple[list[str], Draw, Evidence]:
    rng, u, size = sc.rng, sc.unit, sc.size
    kind = str(rng.choice(["square", "disc", "diamond"]))
    color, cname = _vivid(rng)
    h = rng.uniform(5.5, 7.5) * u
    dist = rng.uniform(0.35, 0.6) * size
    x0 = rng.uniform(h + 2, size - h - 2 - dist)
    y = rng.uniform(0.25, 0.6) * size
    wobble, phase = rng.uniform(0, 2) * u, rng.uniform(0, 2 * math.pi)
    start, dur = sc.window()
    if rng.random() < 0.5:
        sc.full_table()

    def where(t: int) -> tuple[float, float]:
        p = _progress(t, start, dur)
        p = p if variant == "ltr" else 1 - p
        return x0 + dist * p, y + wobble * math.sin(phase + 2 * math.pi * p)

    def draw(f: _Frame, t: int) -> None:
        f.shape(kind, *where(t), h, color)

    def evidence(t: int):  # the direction is the object's motion
        box = _shape_bounds(kind, *where(t), h)
        return box, box, _moving(t, start, dur)

    return [f"{cname} {_NOUNS[kind]}"], draw, evidence


def _path(sc: _Scene, margin: float, min_dist: float) -> tuple[float, float, float, float]:
    """Random start and end points at least ``min_dist`` apart, ``margin`` inside the frame."""
    lo, hi = margin, sc.size - margin
    while True:
        x0, y0, x1, y1 = sc.rng.uniform(lo, hi, size=4)
        if math.hypot(x1 - x0, y1 - y0) >= min_dist:
            return x0, y0, x1, y1


def _scene_notch(sc: _Scene, variant: str) -> tuple[list[str], Draw, Evidence]:
    rng, u = sc.rng, sc.unit
    color, cname = _vivid(rng)
    h = rng.uniform(6.0, 8.0) * u
    angle0, spin = rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.3)
    x0, y0, x1, y1 = _path(sc, 1.5 * h + 1, 0.25 * sc.size)
    sx, sy = rng.choice([-1, 1], size=2)
    cut = rng.uniform(0.75, 0.9) * h  # side of the notch; the square's side is 2h
    start, dur = sc.window()

    def where(t: int) -> tuple[float, float, float]:
        p = _progress(t, start, dur)
        return x0 + (x1 - x0) * p, y0 + (y1 - y0) * p, angle0 + spin * p

    def draw(f: _Frame, t: int) -> None:
        cx, cy, angle = where(t)
        sdf = _box(f.x, f.y, cx, cy, h, h, angle)
        if variant == "notch":
            ox, oy = _rot(angle, sx * h, sy * h)
            sdf = np.maximum(sdf, -_box(f.x, f.y, cx + ox, cy + oy, cut, cut, angle))
        f.paint(sdf, color)

    def evidence(t: int):  # the corner the notch is cut from (intact in the plain class)
        cx, cy, angle = where(t)
        (u0, u1), (v0, v1) = (sorted((k * (h + _AA), k * (h - cut - _AA))) for k in (sx, sy))
        part = _local_bounds(cx, cy, angle, u0, u1, v0, v1)
        return part, _rect_bounds(cx, cy, h, h, angle), True

    return [f"{cname} square"], draw, evidence


def _scene_rotate(sc: _Scene, variant: str) -> tuple[list[str], Draw, Evidence]:
    rng, u, size = sc.rng, sc.unit, sc.size
    color, cname = _vivid(rng)
    marker = (245.0, 245.0, 245.0) if rng.random() < 0.5 else (25.0, 25.0, 25.0)
    half_len, half_w = rng.uniform(7.5, 9.5) * u, rng.uniform(1.7, 2.3) * u
    r = rng.uniform(2.2, 2.8) * u
    cx, cy = rng.uniform(half_len + 2, size - half_len - 2, size=2)
    drift = rng.uniform(-3, 3, size=2) * u
    theta0 = rng.uniform(0, 2 * math.pi)
    turn = rng.uniform(1.2, 2.7) * (1 if variant == "cw" else -1)  # 70-155 degrees
    start, dur = sc.window()

    def where(t: int) -> tuple[float, float, float, float, float]:
        p = _progress(t, start, dur)
        x, y, theta = cx + drift[0] * p, cy + drift[1] * p, theta0 + turn * p
        mx, my = _rot(theta, half_len - 0.6 * r, 0.0)
        return x, y, theta, x + mx, y + my

    def draw(f: _Frame, t: int) -> None:
        x, y, theta, mx, my = where(t)
        f.paint(_box(f.x, f.y, x, y, half_len, half_w, theta), color)
        f.paint(_disc(f.x, f.y, mx, my, r), marker)

    def evidence(t: int):  # the direction is the bar's turn
        x, y, theta, mx, my = where(t)
        box = _union(_rect_bounds(x, y, half_len, half_w, theta), _disc_bounds(mx, my, r))
        return box, box, _moving(t, start, dur)

    return [f"{cname} bar"], draw, evidence


def _scene_fill(sc: _Scene, variant: str) -> tuple[list[str], Draw, Evidence]:
    rng, u, size, span = sc.rng, sc.unit, sc.size, sc.frames - 1
    bottom = sc.full_table(0.8, 0.9)
    liquid, lname = _vivid(rng)
    glass = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.15), rng.uniform(0.75, 0.95))
    cw, ch, wall = rng.uniform(7, 10) * u, rng.uniform(14, 19) * u, rng.uniform(1.3, 1.8) * u
    cx = rng.uniform(cw + 7 * u, size - cw - 7 * u)
    top = bottom - ch
    inner_h = ch - wall
    level0 = rng.uniform(0.0, 0.15)
    stream_x = cx + rng.uniform(-0.4, 0.4) * (cw - wall)
    stream_w = rng.uniform(0.8, 1.1) * u
    spill_sides = [[-1], [1], [-1, 1]][int(rng.integers(3))]
    # the pour ends at the brim; when it overflows it goes on for the spill's last 15-30% frames
    spill = rng.uniform(0.15, 0.3) * span
    start, dur = sc.window(0.45, 0.7, tail=0.3)
    if variant == "brim":
        dur += spill * rng.uniform(0.0, 1.0)  # same time span on average, no spill
    full_at = start + dur
    pour_end = full_at + (spill if variant == "overflow" else 0.0)

    def draw(f: _Frame, t: int) -> None:
        level = level0 + (1 - level0) * _progress(t, start, dur, ease=False)
        surface = bottom - wall - inner_h * level
        f.paint(
            _box(
                f.x,
                f.y,
                cx,
                (surface + bottom - wall) / 2,
                cw - wall,
                (bottom - wall - surface) / 2,
            ),
            liquid,
        )
        outer = _box(f.x, f.y, cx, (top + bottom) / 2, cw, ch / 2)
        inner = _box(
            f.x, f.y, cx, (top - 10 * u + bottom - wall) / 2, cw - wall, (ch + 10 * u - wall) / 2
        )
        f.paint(np.maximum(outer, -inner), glass)
        if start <= t <= pour_end:
            f.paint(
                _box(f.x, f.y, stream_x, (surface - size) / 2, stream_w, (surface + size) / 2),
                liquid,
            )
        if variant == "overflow" and t > full_at:
            q = min(1.0, (t - full_at) / spill)
            f.paint(_box(f.x, f.y, cx, top - 0.5 * u, cw - wall, 0.8 * u), liquid)  # brimming
            run = ch * min(1.0, 1.6 * q)  # down the outer wall, then a puddle on the table
            for side in spill_sides:
                x = cx + side * (cw + 0.6 * u)
                f.paint(_box(f.x, f.y, x, top + run / 2, 0.9 * u, run / 2), liquid)
                if q > 0.6:
                    w = 7 * u * (q - 0.6) / 0.4
                    f.paint(
                        _box(
                            f.x, f.y, x + side * w / 2, bottom - 0.6 * u, w / 2 + 0.9 * u, 0.8 * u
                        ),
                        liquid,
                    )

    glass_box = _rect_bounds(cx, (top + bottom) / 2, cw, ch / 2)
    # brim: the container's top, where the liquid stops (and the overflow would spill over)
    rim = (cx - cw - 1.5 * u - _AA, top - 1.3 * u - _AA, cx + cw + 1.5 * u + _AA, top + wall + _AA)

    def spill_box(t: int) -> Box | None:
        """The overflow as drawn in frame t: the brimming liquid, the runs down the walls and
        the puddles."""
        if variant != "overflow" or not t > full_at:
            return None
        q = min(1.0, (t - full_at) / spill)
        run = ch * min(1.0, 1.6 * q)
        boxes = [_rect_bounds(cx, top - 0.5 * u, cw - wall, 0.8 * u)]
        for side in spill_sides:
            x = cx + side * (cw + 0.6 * u)
            boxes.append(_rect_bounds(x, top + run / 2, 0.9 * u, run / 2))
            if q > 0.6:
                w = 7 * u * (q - 0.6) / 0.4
                boxes.append(
                    _rect_bounds(x + side * w / 2, bottom - 0.6 * u, w / 2 + 0.9 * u, 0.8 * u)
                )
        return _union(*boxes)

    def evidence(t: int):  # the liquid at the brim: spilling over it or not (the last frames)
        part = spill_box(t) if variant == "overflow" else (rim if t >= full_at else None)
        return part, _union(glass_box, part), part is not None

    return [f"{lname} water", "glass"], draw, evidence


def _scene_push(sc: _Scene, variant: str) -> tuple[list[str], Draw, Evidence]:
    rng, u, size = sc.rng, sc.unit, sc.size
    color, cname = _vivid(rng)
    kind = str(rng.choice(["square", "disc"]))
    h = rng.uniform(5.5, 7.0) * u
    side = 1 if rng.random() < 0.5 else -1  # pushed rightwards (table on the left) or mirrored
    top = rng.uniform(0.5, 0.62) * size
    edge = rng.uniform(0.62, 0.8) * size  # in the rightwards frame
    x_start = edge - rng.uniform(0.35, 0.5) * size
    sc.table = (top, -1e9, edge) if side > 0 else (top, size - edge, 1e9)
    y_rest = top - h
    gravity, spin = rng.uniform(0.5, 0.8) * u, rng.uniform(0.08, 0.16)
    floor = size - h - u
    if variant == "falls":
        start, dur = sc.window(0.4, 0.6, tail=0.25)  # reaches the edge at start + dur
        speed = 0.4 * (edge - x_start) / dur  # still moving at the edge
    else:
        start, dur = sc.window(0.5, 0.75)
        stop = edge - rng.uniform(0.05, 0.5) * h  # centre stays on the table

    def where(t: int) -> tuple[float, float, float]:
        s = min(1.0, max(0.0, (t - start) / dur))
        angle, y = 0.0, y_rest
        if variant == "stops":
            x = x_start + (stop - x_start) * (1 - (1 - s) ** 2)
        elif t <= start + dur:
            x = x_start + (edge - x_start) * s * (1.6 - 0.6 * s)
        else:
            tau = t - start - dur
            fall_t = math.sqrt(2 * (floor - y_rest) / gravity)
            tau_x = min(tau, fall_t)  # slides no further once it lands
            x, y = edge + speed * tau_x, min(floor, y_rest + 0.5 * gravity * tau**2)
            angle = spin * tau_x
        x = x if side > 0 else size - x
        return x, y, angle * side

    def draw(f: _Frame, t: int) -> None:
        x, y, angle = where(t)
        f.shape(kind, x, y, h, color, angle)

    def evidence(t: int):  # the outcome: the object going over the edge, or resting at it
        x, y, angle = where(t)
        box = _shape_bounds(kind, x, y, h, angle)
        return box, box, t >= start + dur

    return [f"{cname} {_NOUNS[kind]}"], draw, evidence


def _scene_drop(sc: _Scene, variant: str) -> tuple[list[str], Draw, Evidence]:
    rng, u, size = sc.rng, sc.unit, sc.size
    hue = (348.0 if variant == "crimson" else 8.0) + rng.uniform(-3, 3)
    color = _hsv(hue, rng.uniform(0.8, 0.95), rng.uniform(0.75, 0.95))
    kind = str(rng.choice(["square", "disc"]))
    h = rng.uniform(5.5, 7.5) * u
    table = sc.full_table()
    x, drift = rng.uniform(h + 2, size - h - 2), rng.uniform(-3, 3) * u
    y0, y_rest = rng.uniform(h + 1, 0.35 * size), table - h
    start, dur = sc.window(0.25, 0.45, tail=0.3)  # dur: the free fall
    gravity, bounce = 2 * (y_rest - y0) / dur**2, rng.uniform(0.3, 0.45)

    def height(tau: float) -> float:  # free fall, then bounces losing energy
        if tau < dur:
            return y0 + 0.5 * gravity * max(0.0, tau) ** 2
        tau, v = tau - dur, bounce * gravity * dur
        while v > 0.05 * u:
            if tau < 2 * v / gravity:
                return y_rest - (v * tau - 0.5 * gravity * tau**2)
            tau, v = tau - 2 * v / gravity, v * bounce
        return y_rest

    def where(t: int) -> tuple[float, float]:
        return x + drift * _progress(t, start, dur, ease=False), height(t - start)

    def draw(f: _Frame, t: int) -> None:
        f.shape(kind, *where(t), h, color)

    def evidence(t: int):  # the shade: the whole object, in every frame
        box = _shape_bounds(kind, *where(t), h)
        return box, box, True

    return [_NOUNS[kind]], draw, evidence


def _scene_vertical(sc: _Scene, variant: str) -> tuple[list[str], Draw, Evidence]:
    rng, u, size = sc.rng, sc.unit, sc.size
    color, cname = _vivid(rng)
    kind = str(rng.choice(["square", "disc", "diamond"]))
    h = rng.uniform(5.5, 7.5) * u
    dist = rng.uniform(0.3, 0.5) * size
    x, low = rng.uniform(h + 2, size - h - 2), rng.uniform(h + 2 + dist, size - h - 2)
    start, dur = sc.window()

    def where(t: int) -> float:
        p = _progress(t, start, dur)
        lift = {"up": p, "down": 1 - p, "updown": math.sin(math.pi * p)}[variant]
        return low - dist * lift

    def draw(f: _Frame, t: int) -> None:
        f.shape(kind, x, where(t), h, color)

    def evidence(t: int):  # the direction is the object's motion
        box = _shape_bounds(kind, x, where(t), h)
        return box, box, _moving(t, start, dur)

    return [f"{cname} {_NOUNS[kind]}"], draw, evidence


def _scene_dots(sc: _Scene, variant: str) -> tuple[list[str], Draw, Evidence]:
    rng, u, size = sc.rng, sc.unit, sc.size
    color, cname = _vivid(rng)
    dot = (245.0, 245.0, 245.0) if rng.random() < 0.5 else (25.0, 25.0, 25.0)
    h, r = rng.uniform(7.5, 9.0) * u, rng.uniform(1.6, 2.0) * u
    amp, cycles = rng.uniform(2.5, 5) * u, rng.uniform(2, 4)
    cx, cy = rng.uniform(h + amp + 2, size - h - amp - 2, size=2)
    angle, along = rng.uniform(-0.4, 0.4), rng.uniform(0, math.pi)
    n = int(variant)
    offsets = [(k - (n - 1) / 2) * 2.8 * r for k in range(n)]
    start, dur = sc.window()

    def where(t: int) -> float:
        return cx + amp * math.sin(2 * math.pi * cycles * _progress(t, start, dur, ease=False))

    def draw(f: _Frame, t: int) -> None:
        x = where(t)
        f.paint(_box(f.x, f.y, x, cy, h, h, angle), color)
        for k in offsets:
            dx, dy = _rot(angle + along, k, 0.0)
            f.paint(_disc(f.x, f.y, x + dx, cy + dy, r), dot)

    def evidence(t: int):  # the dots, in every frame
        x = where(t)
        dots = [_rot(angle + along, k, 0.0) for k in offsets]
        part = _union(*(_disc_bounds(x + dx, cy + dy, r) for dx, dy in dots))
        return part, _rect_bounds(x, cy, h, h, angle), True

    return [f"{cname} square"], draw, evidence


def _scene_lid(sc: _Scene, variant: str) -> tuple[list[str], Draw, Evidence]:
    rng, u, size = sc.rng, sc.unit, sc.size
    color, cname = _vivid(rng)
    lid_color = tuple(0.7 * c for c in color)
    bw, bh, th = rng.uniform(7, 10) * u, rng.uniform(5, 7) * u, rng.uniform(1.0, 1.4) * u
    table = sc.full_table(0.7, 0.85)
    cx, cy = rng.uniform(bw + 2, size - bw - 2), table - bh
    hinge = 1 if rng.random() < 0.5 else -1  # hinge on the left (1) or right (-1) corner
    hx, hy = cx - hinge * bw, cy - bh - th
    opened = rng.uniform(1.6, 2.1)  # 90-120 degrees
    start, dur = sc.window()

    def where(t: int) -> tuple[float, float, float]:
        p = _progress(t, start, dur)
        phi = opened * (p if variant == "open" else 1 - p)
        vx, vy = hinge * math.cos(phi), -math.sin(phi)
        return hx + bw * vx, hy + bw * vy, math.atan2(vy, vx)

    def draw(f: _Frame, t: int) -> None:
        lx, ly, lid_angle = where(t)
        f.paint(_box(f.x, f.y, cx, cy, bw, bh), color)
        f.paint(_box(f.x, f.y, lx, ly, bw, th, lid_angle), lid_color)

    def evidence(t: int):  # the lid's swing
        lx, ly, lid_angle = where(t)
        lid = _rect_bounds(lx, ly, bw, th, lid_angle)
        return lid, _union(_rect_bounds(cx, cy, bw, bh), lid), _moving(t, start, dur)

    return [f"{cname} box"], draw, evidence


def _scene_occlude(sc: _Scene, variant: str) -> tuple[list[str], Draw, Evidence]:
    rng, u, size = sc.rng, sc.unit, sc.size
    hue = rng.uniform(0, 360)
    color, cname = _vivid(rng, hue)
    occ_color, oname = _vivid(rng, hue + rng.uniform(120, 240))  # far from the mover's hue
    kind = str(rng.choice(["square", "disc"]))
    h = rng.uniform(5, 7) * u
    ow, oh = rng.uniform(5, 8) * u, rng.uniform(11, 15) * u
    ox, oy = rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.6) * size
    way = 1 if rng.random() < 0.5 else -1
    x0, x1 = ox - way * rng.uniform(0.3, 0.42) * size, ox + way * rng.uniform(0.3, 0.42) * size
    y = oy + rng.uniform(-4, 4) * u
    start, dur = sc.window()

    def where(t: int) -> float:
        return x0 + (x1 - x0) * _progress(t, start, dur)

    def draw(f: _Frame, t: int) -> None:
        x = where(t)
        occluder = _box(f.x, f.y, ox, oy, ow, oh)
        if variant == "front":
            f.paint(occluder, occ_color)
        f.shape(kind, x, y, h, color)
        if variant == "behind":
            f.paint(occluder, occ_color)

    panel = _rect_bounds(ox, oy, ow, oh)
    covered = _rect_bounds(ox, oy, ow, oh, pad=-_AA)  # where the panel covers pixels fully

    def evidence(t: int):  # where the mover and the panel overlap: which one is in front
        mover = _shape_bounds(kind, where(t), y, h)
        hidden = variant == "behind" and _intersection(mover, covered) == mover
        return _intersection(mover, panel), None if hidden else mover, True

    return [f"{cname} {_NOUNS[kind]}", f"{oname} panel"], draw, evidence


def _scene_coarse(sc: _Scene, variant: str) -> tuple[list[str], Draw, Evidence]:
    """Pretraining: one shape (disc, square, diamond, ring) with one coarse motion."""
    rng, u, size = sc.rng, sc.unit, sc.size
    shape, motion = variant.split("-")
    color, cname = _vivid(rng)
    h = rng.uniform(5.5, 8.0) * u
    angle = rng.uniform(0, math.pi / 2)
    start, dur = sc.window(0.6, 0.9)
    cx, cy = rng.uniform(0.3, 0.7, size=2) * size
    if motion == "drift":
        x0, y0, x1, y1 = _path(sc, h + 2, 0.4 * size)
    elif motion == "orbit":
        radius = rng.uniform(0.15, 0.25) * size
        phase, turns = rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.5) * rng.choice([-1, 1])
    elif motion == "bounce":
        height, bounces = rng.uniform(0.2, 0.35) * size, int(rng.integers(2, 4))
        floor = rng.uniform(0.7, 0.85) * size
    else:  # pulse
        grow, cycles = rng.uniform(0.6, 1.0), rng.uniform(1.5, 3)

    def where(t: int) -> tuple[float, float, float]:
        p = _progress(t, start, dur, ease=motion == "drift")
        x, y, r = cx, cy, h
        if motion == "drift":
            x, y = x0 + (x1 - x0) * p, y0 + (y1 - y0) * p
        elif motion == "orbit":
            a = phase + 2 * math.pi * turns * p
            x, y = cx + radius * math.cos(a), cy + radius * math.sin(a)
        elif motion == "bounce":
            y = floor - h - height * abs(math.sin(math.pi * bounces * p))
        else:
            r = h * (1 + grow * 0.5 * (1 - math.cos(2 * math.pi * cycles * p)))
        return x, y, r

    def draw(f: _Frame, t: int) -> None:
        x, y, r = where(t)
        if shape == "ring":
            f.paint(np.abs(_disc(f.x, f.y, x, y, r)) - 0.35 * r, color)
        else:
            f.shape(shape, x, y, r, color, angle)

    def evidence(t: int):  # coarse classes: the object only
        x, y, r = where(t)
        box = (
            _disc_bounds(x, y, 1.35 * r)
            if shape == "ring"
            else _shape_bounds(shape, x, y, r, angle)
        )
        return None, box, False

    return [f"{cname} {shape}"], draw, evidence


_SCENES: dict[str, Callable[[_Scene, str], tuple[list[str], Draw, Evidence]]] = {
    "coarse": _scene_coarse,
    "slide": _scene_slide,
    "notch": _scene_notch,
    "rotate": _scene_rotate,
    "fill": _scene_fill,
    "push": _scene_push,
    "drop": _scene_drop,
    "vertical": _scene_vertical,
    "dots": _scene_dots,
    "lid": _scene_lid,
    "occlude": _scene_occlude,
}


# --- distractors ------------------------------------------------------------------------------


def _upsample(grid: np.ndarray, n: int) -> np.ndarray:
    """Bilinear (k, k) → (n, n)."""
    k = grid.shape[0]
    pos = np.linspace(0, k - 1, n)
    i = np.minimum(pos.astype(int), k - 2)
    w = (pos - i)[:, None]
    rows = grid[i] * (1 - w) + grid[i + 1] * w  # (n, k)
    return rows[:, i] * (1 - w.T) + rows[:, i + 1] * w.T


def _background(sc: _Scene, margin: int) -> np.ndarray:
    """The static world: a texture (smooth blobs, stripes or a checkerboard) and maybe a table,
    ``margin`` px larger than the frame on every side for the camera jitter."""
    rng, u, n = sc.rng, sc.unit, sc.size + 2 * margin
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) - margin + 0.5
    kind = rng.integers(3)
    if kind == 0:
        weight = _upsample(rng.random((int(rng.integers(3, 7)),) * 2), n)
    elif kind == 1:
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 16) * u
        weight = 0.5 + 0.5 * np.sin(
            2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period
        )
    else:
        period = rng.uniform(6, 14) * u
        weight = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    c1, c2 = np.array(_muted(rng)), np.array(_muted(rng))
    c2 = c1 + rng.uniform(0.3, 0.8) * (c2 - c1)
    img = c1 + (c2 - c1) * weight[..., None].astype(np.float32)
    img += rng.normal(0, 3, (n, n, 1))
    if sc.table is not None:
        top, x_from, x_to = sc.table
        color = np.array(_muted(rng, 0.35, 0.75))
        grain = 1 + 0.06 * np.sin(2 * math.pi * yy / rng.uniform(2.5, 5) / u + rng.uniform(0, 6))
        cover = np.clip(yy - top + 0.5, 0, 1) * np.clip(xx - x_from + 0.5, 0, 1)
        cover *= np.clip(x_to - xx + 0.5, 0, 1)
        img += cover[..., None] * (color * grain[..., None] - img)
        rim = np.clip(1 - np.abs(yy - top - 0.5 * u), 0, 1) * cover  # a lighter top edge
        img += 0.5 * rim[..., None] * (255 - img)
    return img.astype(np.float32)


def _clutter(sc: _Scene) -> list[Draw]:
    """1-3 greyish discs, rings or bars; some drift slowly. Drawn under the main object."""
    rng, u, size = sc.rng, sc.unit, sc.size
    items = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(3))
        cx, cy = rng.uniform(0, size, size=2)
        r, angle = rng.uniform(3, 6) * u, rng.uniform(0, math.pi)
        color = _hsv(rng.uniform(0, 360), rng.uniform(0.2, 0.55), rng.uniform(0.4, 0.85))
        vx, vy = rng.uniform(-0.3, 0.3, size=2) * u * (rng.random() < 0.3)

        def draw(
            f: _Frame, t: int, kind=kind, cx=cx, cy=cy, r=r, angle=angle, color=color, vx=vx, vy=vy
        ) -> None:
            x, y = cx + vx * t, cy + vy * t
            if kind == 0:
                sdf = _disc(f.x, f.y, x, y, r)
            elif kind == 1:
                sdf = np.abs(_disc(f.x, f.y, x, y, r)) - 0.5 * u
            else:
                sdf = _box(f.x, f.y, x, y, r, 0.35 * r, angle)
            f.paint(sdf, color)

        items.append(draw)
    return items


def render(
    class_index: int,
    *,
    size: int = 64,
    seed: int = 0,
    index: int = 0,
    kind: str = "finegrained",
    with_evidence: bool = False,
):
    """Render one clip of class ``class_index`` of ``kind`` (``CLASSES`` or, for
    ``"pretrain"``, ``PRETRAIN_CLASSES``) from generator (seed, index).

    Returns ``(frames (T, size, size, 3) uint8, placeholders)``, T in [MIN_FRAMES, MAX_FRAMES];
    ``with_evidence``: ``(frames, placeholders, evidence)``, the video's ``evidence.json``
    entry (see the module docstring). The pixels are the same either way.
    """
    cls = KINDS[kind][class_index]
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    sc = _Scene(rng, size, int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1)))
    placeholders, draw, evidence = _SCENES[cls.scene](sc, cls.variant)
    margin = max(1, round(2 * sc.unit))
    world = _background(sc, margin)
    clutter = _clutter(sc)
    # camera jitter: a random walk of whole pixels (none in 30% of the clips)
    steps = rng.integers(-1, 2, size=(sc.frames, 2)) * (rng.random() < 0.7)
    jitter = np.clip(np.cumsum(steps, axis=0), -margin, margin)
    # brightness: a gain per clip, a flicker per frame, sensor noise per pixel
    gain = rng.uniform(0.85, 1.15) * (1 + rng.normal(0, 0.03, sc.frames))
    sigma = np.float32(rng.uniform(1, 4))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out = np.empty((sc.frames, size, size, 3), np.uint8)
    for t in range(sc.frames):
        jx, jy = (int(v) for v in jitter[t])
        crop = world[margin + jy : margin + jy + size, margin + jx : margin + jx + size].copy()
        f = _Frame(crop, xx + jx, yy + jy)
        for item in clutter:
            item(f, t)
        draw(f, t)
        img = f.img * np.float32(gain[t]) + sigma * rng.standard_normal(f.img.shape, np.float32)
        out[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if not with_evidence:
        return out, placeholders
    truth: dict = {"height": size, "width": size, "part": [], "object": [], "visible": []}
    for t in range(sc.frames):
        jx, jy = (int(v) for v in jitter[t])
        part, obj, visible = evidence(t)
        truth["part"].append(_frame_box(part, jx, jy, size))
        truth["object"].append(_frame_box(obj, jx, jy, size))
        truth["visible"].append(int(visible and truth["part"][-1] is not None))
    return out, placeholders, truth


# --- dataset ---------------------------------------------------------------------------------


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _options(
    classes, videos_per_class, size, seed, val_fraction, fps, workers,
    kind="finegrained", val_videos_per_class=None,
) -> dict:  # fmt: skip
    """Validated options (``workers`` checked but not part of the output's identity; ``kind``
    and ``val_videos_per_class`` only when not their defaults, so benchmarks generated before
    these options existed keep their identity)."""
    _check_int("workers", workers, 1, 256)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    opts = {
        "classes": _check_int("classes", classes, 2, len(KINDS[kind])),
        "videos_per_class": _check_int("videos_per_class", videos_per_class, 1, 100_000),
        "size": _check_int("size", size, 32, 512),
        "seed": _check_int("seed", seed, 0, 2**63 - 1),
        "fps": _check_int("fps", fps, 1, 120),
    }
    if opts["size"] % 2:
        raise ValueError(f"size must be even (H.264 yuv420p), got {size}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if val_videos_per_class is None:
        n_val = math.floor(opts["videos_per_class"] * val_fraction + 0.5)
        if n_val >= opts["videos_per_class"]:
            raise ValueError(
                f"val_fraction={val_fraction} leaves no training video of "
                f"videos_per_class={videos_per_class}; lower val_fraction or raise "
                "videos_per_class"
            )
    opts["val_fraction"] = float(val_fraction)
    if kind != "finegrained":
        opts["kind"] = kind
    if val_videos_per_class is not None:
        opts["val_videos_per_class"] = _check_int(
            "val_videos_per_class", val_videos_per_class, 1, 100_000
        )
    return opts


def _plan(opts: dict) -> tuple[list[int], set[int]]:
    """Class of every video index (shuffled, so ids do not give the class away) and the
    validation indices: ``val_videos_per_class`` more videos of every class when given (the
    class then has ``videos_per_class`` training videos), else ``round(val_fraction *
    videos_per_class)`` of its ``videos_per_class``."""
    k, n = opts["classes"], opts["videos_per_class"]
    n_val = opts.get("val_videos_per_class")
    if n_val is None:
        n_val = math.floor(n * opts["val_fraction"] + 0.5)
    else:
        n += n_val
    rng = np.random.default_rng(opts["seed"])
    labels = [int(c) for c in rng.permutation(np.repeat(np.arange(k), n))]
    val = set()
    for c in range(k):
        members = [i for i, label in enumerate(labels) if label == c]
        val.update(int(i) for i in rng.choice(members, n_val, replace=False))
    return labels, val


def _video_id(index: int) -> str:
    return str(index + 1)


def _make_video(task: tuple) -> tuple[int, list[str], int, int, dict]:
    """Render and encode one video (runs in a worker): → (index, placeholders, frames, bytes,
    evidence)."""
    index, class_index, seed, size, fps, path, kind = task
    frames, placeholders, evidence = render(
        class_index, size=size, seed=seed, index=index, kind=kind, with_evidence=True
    )
    write_mp4(path, frames, fps=fps)
    return index, placeholders, len(frames), Path(path).stat().st_size, evidence


def _label(template: str, placeholders: list[str]) -> str:
    """SSv2's ``label``: the template with its placeholders filled in, lower case."""
    for word in placeholders:
        template = template.replace("[something]", word, 1)
    return template.lower()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _write_evidence(path: Path, evidence: dict[str, dict]) -> None:
    """``evidence.json``: one compact line per video."""
    lines = [f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in evidence.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def generate(
    out: str | Path,
    *,
    classes: int = DEFAULT_CLASSES,
    videos_per_class: int = 24,
    size: int = 64,
    seed: int = 0,
    workers: int = 2,
    val_fraction: float = 0.25,
    fps: int = 12,
    progress: bool = True,
    kind: str = "finegrained",
    val_videos_per_class: int | None = None,
) -> dict:
    """Write the benchmark under ``out`` (SSv2 layout, see the module docstring).

    Options: ``classes`` the first K classes of :data:`CLASSES` (2..22; ``kind="pretrain"``: of
    :data:`PRETRAIN_CLASSES`, 2..16), ``videos_per_class``, ``size`` (even, 32..512 px),
    ``seed``, ``workers`` (processes; the output does not depend on it), ``val_fraction`` (per
    class, in [0, 1)) or ``val_videos_per_class`` (that many validation videos per class on top
    of ``videos_per_class`` training videos), ``fps``. Returns a summary dict (videos, train,
    val, classes, frames, bytes, seconds, out). Bad options raise ``ValueError`` before anything
    is written. ``workers > 1`` spawns processes, so a calling script needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    opts = _options(
        classes, videos_per_class, size, seed, val_fraction, fps, workers, kind,
        val_videos_per_class,
    )  # fmt: skip
    t0 = time.perf_counter()
    out = Path(out)
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    ours = (out / MARKER).is_file()  # a benchmark generated here before: its videos may go
    (out / MARKER).unlink(missing_ok=True)
    labels, val = _plan(opts)
    tasks = [
        (i, c, opts["seed"], opts["size"], opts["fps"], str(videos / f"{_video_id(i)}.mp4"), kind)
        for i, c in enumerate(labels)
    ]
    results: dict[int, tuple[list[str], int, int, dict]] = {}
    step = max(1, math.ceil(len(tasks) / 10))

    def record(result: tuple[int, list[str], int, int, dict]) -> None:
        results[result[0]] = result[1:]
        if progress and (len(results) % step == 0 or len(results) == len(tasks)):
            print(
                f"[synthetic] {len(results)}/{len(tasks)} videos "
                f"({100 * len(results) // len(tasks)}%) {time.perf_counter() - t0:.1f}s",
                flush=True,
            )

    if workers == 1:
        for task in tasks:
            record(_make_video(task))
    else:
        # spawn, not fork: callers may hold threads (Ray, torch) that fork would copy mid-state
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for result in pool.map(_make_video, tasks, chunksize=4):
                record(result)

    chosen = KINDS[kind][: opts["classes"]]
    _write_json(out / "labels.json", {c.name: str(i) for i, c in enumerate(chosen)})
    _write_json(
        out / "classes.json",
        {
            c.name: {
                "index": i,
                "group": c.group,
                "subtlety": c.subtlety,
                "template": c.template,
                "description": c.description,
            }
            for i, c in enumerate(chosen)
        },
    )
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for i, c in enumerate(labels):
        template, placeholders = chosen[c].template, results[i][0]
        splits["validation" if i in val else "train"].append(
            {
                "id": _video_id(i),
                "label": _label(template, placeholders),
                "template": template,
                "placeholders": placeholders,
            }
        )
    for split, entries in splits.items():
        _write_json(out / f"{split}.json", entries)
    _write_evidence(out / EVIDENCE, {_video_id(i): results[i][3] for i in range(len(labels))})
    if ours:  # remove the videos of an earlier, larger benchmark (never files we did not write)
        keep = {f"{_video_id(i)}.mp4" for i in range(len(labels))}
        for stale in videos.glob("*.mp4"):
            if stale.name not in keep:
                stale.unlink()

    total_bytes = sum(r[2] for r in results.values())
    total_frames = sum(r[1] for r in results.values())
    counts = {"videos": len(labels), "train": len(splits["train"]), "val": len(val)}
    marker = {"generator": __name__, "version": GENERATOR_VERSION, "options": opts, **counts}
    _write_json(out / MARKER, {**marker, "frames": total_frames, "bytes": total_bytes})
    summary = {
        **counts,
        "classes": opts["classes"],
        "frames": total_frames,
        "bytes": total_bytes,
        "seconds": round(time.perf_counter() - t0, 2),
        "out": str(out),
    }
    if progress:
        print(
            f"[synthetic] wrote {summary['videos']} videos ({summary['train']} train / "
            f"{summary['val']} val) of {summary['classes']} classes, {opts['size']} px, "
            f"{total_frames} frames, {total_bytes / 1e6:.1f} MB in {summary['seconds']:.1f}s "
            f"→ {out}",
            flush=True,
        )
    return summary


def ensure_synthetic(
    out: str | Path,
    *,
    classes: int = DEFAULT_CLASSES,
    videos_per_class: int = 24,
    size: int = 64,
    seed: int = 0,
    workers: int = 2,
    val_fraction: float = 0.25,
    fps: int = 12,
    progress: bool = True,
    kind: str = "finegrained",
    val_videos_per_class: int | None = None,
) -> Path:
    """``out``, generated first unless it already holds a complete benchmark with these options.

    Complete means: the marker (written last by :func:`generate`) names this generator version
    and these options, every annotated video exists and ``evidence.json`` covers them (a
    benchmark generated before the ground truth was written is regenerated: same pixels).
    Anything else regenerates.
    """
    opts = _options(
        classes, videos_per_class, size, seed, val_fraction, fps, workers, kind,
        val_videos_per_class,
    )  # fmt: skip
    out = Path(out)
    if _is_complete(out, opts):
        if progress:
            print(f"[synthetic] using the existing benchmark in {out}", flush=True)
        return out
    generate(
        out,
        classes=classes,
        videos_per_class=videos_per_class,
        size=size,
        seed=seed,
        workers=workers,
        val_fraction=val_fraction,
        fps=fps,
        progress=progress,
        kind=kind,
        val_videos_per_class=val_videos_per_class,
    )
    return out


def _is_complete(out: Path, opts: dict) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
        if marker.get("version") != GENERATOR_VERSION or marker.get("options") != opts:
            return False
        entries = [
            e for s in ("train", "validation") for e in json.loads((out / f"{s}.json").read_text())
        ]
        if len(entries) != marker.get("videos") or not (out / "labels.json").is_file():
            return False
        # benchmarks generated before the ground truth existed have no evidence.json
        if set(json.loads((out / EVIDENCE).read_text())) != {e["id"] for e in entries}:
            return False
        return all((out / "videos" / f"{e['id']}.mp4").stat().st_size > 0 for e in entries)
    except (OSError, ValueError, KeyError, TypeError):
        return False
