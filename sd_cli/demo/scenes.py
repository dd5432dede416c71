"""The demo model's world: simple scenes (one colored shape on a plain background), their captions, the
held-out combinations, and a classifier that reads shape and colors back from an image.

Pure numpy + Pillow (no torch), so the evaluator and the tests can use it without the training tool.

A scene is (shape, color, background): 4 shapes x 5 colors x 4 other background colors = 80
combinations. HELD_OUT lists 16 of them that the training data never shows whole (every pair of
their parts does occur in training); the evaluator renders exactly those prompts.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # native image size of the demo model (latent 8x8 with the f=8 VAE)
# Guidance scale the CLI uses for the demo model unless --scale is given: the most accurate on held-out prompts
# across samplers and step counts; 7.5 overshoots at few steps (README "The demo model", bench/results/NOTES.md).
GUIDANCE = 3.0
SHAPES = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "white": (245, 245, 245),
}
COLOR_NAMES = tuple(COLORS)
TEMPLATES = (
    "a {color} {shape} on a {bg} background",
    "a {color} {shape} on {bg}",
    "{color} {shape}, {bg} background",
    "a {bg} background with a {color} {shape}",
    "a picture of a {color} {shape} on a {bg} background",
)
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    bg: str
    # A second background colour on one side of the picture (training scenes that teach the model that
    # the background may change across the image, which inpainting one side needs); None: a plain one.
    bg2: str | None = None

    def prompt(self, template: int = 0) -> str:
        bg = self.bg if self.bg2 is None else f"{self.bg} and {self.bg2}"
        return TEMPLATES[template].format(color=self.color, shape=self.shape, bg=bg)


def all_scenes() -> list[Scene]:
    return [Scene(s, c, b) for s in SHAPES for c in COLOR_NAMES for b in COLOR_NAMES if b != c]


@functools.lru_cache(maxsize=None)
def held_out(seed: int = 1234, n: int = 16) -> tuple[Scene, ...]:
    """n scenes never shown whole in training: at most one per (color, bg) and per (shape, color) and
    (shape, bg) pair, so every pair of their parts still occurs in the training set; each shape n/4 times."""
    rng = random.Random(seed)
    for _ in range(10000):
        scenes = all_scenes()
        rng.shuffle(scenes)
        picked: list[Scene] = []
        used: set[tuple] = set()
        per_shape: dict[str, int] = {}
        for s in scenes:
            keys = {("cb", s.color, s.bg), ("sc", s.shape, s.color), ("sb", s.shape, s.bg)}
            if keys & used or per_shape.get(s.shape, 0) >= n // len(SHAPES):
                continue
            picked.append(s)
            used |= keys
            per_shape[s.shape] = per_shape.get(s.shape, 0) + 1
            if len(picked) == n:
                return tuple(sorted(picked, key=lambda x: (SHAPES.index(x.shape), x.color, x.bg)))
    raise RuntimeError("no held-out set found")  # pragma: no cover


def train_scenes() -> list[Scene]:
    out = set(held_out())
    return [s for s in all_scenes() if s not in out]


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape whose bounding box is the square of half-side r around (cx, cy); None = circle."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "cross":
        a = r / 3.0
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


# Where a split scene's second background colour goes: the side, and the fraction of the picture it covers.
SIDES = ("left", "right", "top", "bottom")


def render(scene: Scene, cx: float = 32.0, cy: float = 32.0, r: float = 18.0, size: int = SIZE,
           split: tuple[str, float] = ("right", 0.5)) -> np.ndarray:
    """(size, size, 3) uint8: the shape (bounding box 2r, centred at cx, cy) on its background, antialiased.
    A scene with bg2 has that colour on `split` = (side, fraction of the width or height) of the picture."""
    k = _SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k), COLORS[scene.bg])
    draw = ImageDraw.Draw(img)
    if scene.bg2 is not None:
        side, frac = split
        n = round(frac * size * k)
        box = {"left": (0, 0, n, size * k), "right": (size * k - n, 0, size * k, size * k),
               "top": (0, 0, size * k, n), "bottom": (0, size * k - n, size * k, size * k)}[side]
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=COLORS[scene.bg2])
    poly = _shape_polygon(scene.shape, cx * k, cy * k, r * k)
    fill = COLORS[scene.color]
    if poly is None:
        draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=fill)
    else:
        draw.polygon(poly, fill=fill)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX))


def random_layout(rng: np.random.Generator, size: int = SIZE) -> tuple[float, float, float]:
    """A random (cx, cy, r): bounding box 28..44 px of a 64 px image, centre within 8 px of the middle."""
    s = size / 64.0
    r = rng.uniform(14.0, 22.0) * s
    cx = size / 2 + rng.uniform(-8.0, 8.0) * s
    cy = size / 2 + rng.uniform(-8.0, 8.0) * s
    return cx, cy, r


def split_scenes() -> list[Scene]:
    """Training scenes with a second background colour: (shape, color, bg, bg2) where both (shape, color,
    bg) and (shape, color, bg2) are training scenes, so no held-out combination is shown even in part."""
    train = set(train_scenes())
    return [Scene(s.shape, s.color, s.bg, b) for s in sorted(train, key=lambda x: (x.shape, x.color, x.bg))
            for b in COLOR_NAMES if b not in (s.color, s.bg) and Scene(s.shape, s.color, b) in train]


def random_split(rng: np.random.Generator) -> tuple[str, float]:
    """A random side and fraction (0.3..0.7) for a split scene's second background colour."""
    return SIDES[int(rng.integers(len(SIDES)))], float(rng.uniform(0.3, 0.7))


def sample_batch(rng: np.random.Generator, scenes: list[Scene], n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n random training examples: images (n, 64, 64, 3) uint8, captions (random phrasing), scenes."""
    imgs, caps, picked = [], [], []
    for _ in range(n):
        scene = scenes[int(rng.integers(len(scenes)))]
        imgs.append(render(scene, *random_layout(rng)))
        caps.append(scene.prompt(int(rng.integers(len(TEMPLATES)))))
        picked.append(scene)
    return np.stack(imgs), caps, picked


def parse_prompt(prompt: str) -> Scene | None:
    """The scene a prompt describes (any phrasing with one shape, a color before it and one other color)."""
    words = prompt.lower().replace(",", " ").split()
    shapes = [w for w in words if w in SHAPES]
    colors = [w for w in words if w in COLORS]
    if len(shapes) != 1 or len(colors) != 2 or colors[0] == colors[1]:
        return None
    # The shape's color is the one right before the shape word; the other is the background.
    i = words.index(shapes[0])
    color = words[i - 1] if i > 0 and words[i - 1] in COLORS else None
    if color is None:
        return None
    bg = colors[1] if colors[0] == color else colors[0]
    return Scene(shapes[0], color, bg)


# ----------------------------------------------------------------------------------------------------
# Classifier: nearest palette color per pixel, background = the border's color, foreground = the most
# common other color, shape = best IoU of the foreground mask (cropped to its bounding box) with templates.

_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # (5, 3)
_GRID = 24


@functools.lru_cache(maxsize=None)
def _templates() -> dict[str, np.ndarray]:
    """Each shape filling a _GRID x _GRID box, as a float mask in [0, 1]."""
    out = {}
    for shape in SHAPES:
        img = render(Scene(shape, "white", "red"), _GRID / 2, _GRID / 2, _GRID / 2, size=_GRID)
        out[shape] = (_nearest(img) == COLOR_NAMES.index("white")).astype(np.float32)
    return out


def _nearest(img: np.ndarray) -> np.ndarray:
    d = ((img[..., None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)  # (H, W, 5)
    return d.argmin(-1)


@dataclass(frozen=True)
class Reading:
    shape: str | None
    color: str | None
    bg: str | None
    fg_fraction: float
    shape_score: float

    def matches(self, scene: Scene) -> bool:
        return (self.shape, self.color, self.bg) == (scene.shape, scene.color, scene.bg)


def classify(img: np.ndarray) -> Reading:
    """Read (shape, color, background) from an (H, W, 3) uint8 image."""
    h, w = img.shape[:2]
    lab = _nearest(img)
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    bg = int(np.bincount(border, minlength=len(COLOR_NAMES)).argmax())
    counts = np.bincount(lab.ravel(), minlength=len(COLOR_NAMES))
    counts[bg] = 0
    fg = int(counts.argmax())
    frac = float(counts[fg]) / (h * w)
    if frac < 0.03:
        return Reading(None, None, COLOR_NAMES[bg], frac, 0.0)
    mask = lab == fg
    ys, xs = np.nonzero(mask)
    y0, y1 = np.percentile(ys, [0.5, 99.5])
    x0, x1 = np.percentile(xs, [0.5, 99.5])
    y0, x0 = int(np.floor(y0)), int(np.floor(x0))
    y1, x1 = int(np.ceil(y1)) + 1, int(np.ceil(x1)) + 1
    crop = Image.fromarray((mask[y0:y1, x0:x1] * 255).astype(np.uint8)).resize((_GRID, _GRID), Image.Resampling.BILINEAR)
    m = np.asarray(crop, dtype=np.float32) / 255.0
    scores = {}
    for shape, t in _templates().items():
        inter = np.minimum(m, t).sum()
        union = np.maximum(m, t).sum()
        scores[shape] = float(inter / max(union, 1e-6))
    best = max(scores, key=scores.get)
    return Reading(best, COLOR_NAMES[fg], COLOR_NAMES[bg], frac, scores[best])
