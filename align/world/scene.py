"""World parameters, the scene graph and object placement for the procedural shapes world."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

# Well separated in RGB (pairwise distance > 80) so a 64 px render leaves no doubt about a color.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")

DEFAULT_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
DEFAULT_SHAPES = ("circle", "square", "triangle")
MIN_IMAGE_SIZE = 32
# Counts are written with number words up to "ten" in captions and accepted as such by the verifier.
MAX_OBJECTS = 10
# Below this a triangle and a circle become the same blob of pixels.
MIN_OBJECT_PX = 5
PLACEMENT_ATTEMPTS = 200
_ATTRIBUTE_SUBSETS = [
    tuple(key for key, bit in zip(("size", "color", "shape"), (4, 2, 1)) if mask & bit) for mask in range(8)
]


@dataclass
class WorldConfig:
    """Parameters of the shapes world; every invalid value raises a `ValueError` naming the field."""

    image_size: int = field(default=64, metadata={"help": f"Width and height of the images in pixels (>= {MIN_IMAGE_SIZE})."})
    min_objects: int = field(default=1, metadata={"help": "Fewest objects in a scene (>= 1)."})
    max_objects: int = field(default=6, metadata={"help": f"Most objects in a scene (min_objects..{MAX_OBJECTS})."})
    colors: list[str] = field(
        default_factory=lambda: list(DEFAULT_COLORS),
        metadata={"help": f"Object colors, names from {sorted(COLORS)}."},
    )
    shapes: list[str] = field(
        default_factory=lambda: list(DEFAULT_SHAPES), metadata={"help": f"Object shapes, names from {list(SHAPES)}."}
    )
    background: str = field(default="gray", metadata={"help": "Background color name; must not be an object color."})
    small_frac: float = field(default=0.17, metadata={"help": "Width of a small object as a fraction of image_size."})
    large_frac: float = field(default=0.28, metadata={"help": "Width of a large object as a fraction of image_size."})
    min_turns: int = field(default=2, metadata={"help": "Fewest question-answer turns in a conversation (>= 1)."})
    max_turns: int = field(default=4, metadata={"help": "Most question-answer turns in a conversation."})

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {self.image_size!r}")
        if not isinstance(self.min_objects, int) or self.min_objects < 1:
            raise ValueError(f"min_objects must be an integer >= 1, got {self.min_objects!r}")
        if not isinstance(self.max_objects, int) or self.max_objects < 1:
            raise ValueError(f"max_objects must be an integer >= 1, got {self.max_objects!r}")
        if self.max_objects < self.min_objects:
            raise ValueError(f"max_objects ({self.max_objects}) must be >= min_objects ({self.min_objects})")
        if self.max_objects > MAX_OBJECTS:
            raise ValueError(f"max_objects must be <= {MAX_OBJECTS}, got {self.max_objects}")
        self.colors = _check_names("colors", self.colors, list(COLORS))
        self.shapes = _check_names("shapes", self.shapes, list(SHAPES))
        if len(self.colors) < 2:
            raise ValueError(f"colors needs at least 2 names so color questions mean something, got {self.colors}")
        if self.background not in COLORS:
            raise ValueError(f"background must be one of {sorted(COLORS)}, got {self.background!r}")
        if self.background in self.colors:
            raise ValueError(f"background {self.background!r} is also in colors; objects would vanish into it")
        if not 0 < self.small_frac < self.large_frac <= 0.5:
            raise ValueError(
                f"small_frac and large_frac must satisfy 0 < small_frac < large_frac <= 0.5, "
                f"got small_frac={self.small_frac}, large_frac={self.large_frac}"
            )
        if self.small_px < MIN_OBJECT_PX:
            raise ValueError(
                f"small_frac={self.small_frac} gives {self.small_px} px small objects at image_size={self.image_size}; "
                f"shapes need at least {MIN_OBJECT_PX} px"
            )
        if self.large_px < self.small_px + 3:
            raise ValueError(
                f"large_frac={self.large_frac} gives large objects ({self.large_px} px) too close to small ones "
                f"({self.small_px} px) to tell the sizes apart"
            )
        # Feasibility: max_objects large objects must fit side by side in a grid with the minimum gap.
        per_row = (self.image_size - 2 * self.margin_px + self.gap_px) // (self.large_px + self.gap_px)
        if per_row * per_row < self.max_objects:
            raise ValueError(
                f"image_size={self.image_size} is too small for max_objects={self.max_objects}: at most "
                f"{per_row * per_row} large objects of {self.large_px} px fit; raise image_size or lower max_objects"
            )
        if not isinstance(self.min_turns, int) or self.min_turns < 1:
            raise ValueError(f"min_turns must be an integer >= 1, got {self.min_turns!r}")
        if not isinstance(self.max_turns, int) or self.max_turns < self.min_turns:
            raise ValueError(f"max_turns ({self.max_turns!r}) must be an integer >= min_turns ({self.min_turns})")

    @property
    def small_px(self) -> int:
        return round(self.small_frac * self.image_size)

    @property
    def large_px(self) -> int:
        return round(self.large_frac * self.image_size)

    @property
    def gap_px(self) -> int:
        """Least empty space between two objects' bounding boxes."""
        return max(1, round(0.03 * self.image_size))

    @property
    def margin_px(self) -> int:
        """Least empty space between an object and the image border."""
        return max(1, round(0.02 * self.image_size))

    @property
    def spatial_px(self) -> int:
        """Least space between two objects' extents along an axis before a spatial question is asked."""
        return max(2, round(0.05 * self.image_size))


def _check_names(name: str, values, known: list[str]) -> list[str]:
    if isinstance(values, str):
        values = [values]
    values = list(values)
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"{name} has unknown names {unknown}; supported: {known}")
    if not values:
        raise ValueError(f"{name} must not be empty; supported: {known}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}")
    return values


@dataclass
class SceneObject:
    """One object: attributes plus its square bounding box `[x0, x0 + width) x [y0, y0 + width)`."""

    id: int
    shape: str
    color: str
    size: str
    x0: int
    y0: int
    width: int

    @property
    def x1(self) -> int:
        return self.x0 + self.width

    @property
    def y1(self) -> int:
        return self.y0 + self.width

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.width / 2, self.y0 + self.width / 2)

    @property
    def center_pixel(self) -> tuple[int, int]:
        """A pixel inside the filled shape, whatever the shape."""
        return (self.x0 + self.width // 2, self.y0 + self.width // 2)


@dataclass
class Scene:
    """A scene graph: image size, background and objects; relations are derived from the boxes."""

    image_size: int
    background: str
    objects: list[SceneObject]
    spatial_px: int
    _counts: Counter | None = field(default=None, init=False, repr=False, compare=False)

    def count(self, query: dict) -> int:
        """Number of objects whose attributes match `query`, e.g. {"color": "red", "shape": "circle"}."""
        unknown = set(query) - {"size", "color", "shape"}
        if unknown:
            raise ValueError(f"query has unknown attributes {sorted(unknown)}; supported: size, color, shape")
        if self._counts is None:
            # Every subset of (size, color, shape) of every object, counted once: question generation
            # asks dozens of counts per scene.
            self._counts = Counter(
                tuple((key, getattr(o, key)) for key in subset)
                for o in self.objects
                for subset in _ATTRIBUTE_SUBSETS
            )
        return self._counts[tuple((key, query[key]) for key in ("size", "color", "shape") if key in query)]

    def to_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "background": self.background,
            "spatial_px": self.spatial_px,
            "objects": [
                {
                    **asdict(o),
                    "bbox": [o.x0, o.y0, o.x1, o.y1],
                    "center": list(o.center),
                    "position": coarse_position(o, self.image_size),
                }
                for o in self.objects
            ],
            "relations": [
                {"subject": a.id, "predicate": predicate, "object": b.id}
                for a in self.objects
                for b in self.objects
                for predicate in ("left_of", "above")
                if a is not b and relation_holds(a, b, predicate, self.spatial_px)
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        fields = ("id", "shape", "color", "size", "x0", "y0", "width")
        objects = [SceneObject(**{k: o[k] for k in fields}) for o in data["objects"]]
        return cls(data["image_size"], data["background"], objects, data["spatial_px"])

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls.from_dict(json.loads(text))


def relation_holds(a: SceneObject, b: SceneObject, predicate: str, spatial_px: int) -> bool:
    """Whether `a <predicate> b` holds beyond doubt: their extents on that axis are `spatial_px` apart.

    Predicates: left_of, right_of, above, below (image y grows downwards).
    """
    if predicate == "left_of":
        return a.x1 + spatial_px <= b.x0
    if predicate == "right_of":
        return b.x1 + spatial_px <= a.x0
    if predicate == "above":
        return a.y1 + spatial_px <= b.y0
    if predicate == "below":
        return b.y1 + spatial_px <= a.y0
    raise ValueError(f"unknown predicate {predicate!r}; supported: left_of, right_of, above, below")


def coarse_position(obj: SceneObject, image_size: int) -> str:
    """Cell of a 3x3 grid holding the object's center, e.g. "top left", "middle center"."""
    cx, cy = obj.center
    column = "left" if cx < image_size / 3 else "right" if cx > 2 * image_size / 3 else "center"
    row = "top" if cy < image_size / 3 else "bottom" if cy > 2 * image_size / 3 else "middle"
    return f"{row} {column}"


def split_seed(seed: int, split: str) -> int:
    """A 64-bit seed for one split; different split names give unrelated streams."""
    digest = hashlib.sha256(f"vlm-align-world:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def image_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator for image `index` of `split`, so any image can be regenerated on its own."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return random.Random(split_seed(seed, split) * 2**32 + index)


def generate_scene(config: WorldConfig, rng: random.Random) -> Scene:
    """Sample a scene: object count, attributes, and non-overlapping positions.

    Raises:
        ValueError: when no non-overlapping placement is found (the world is too crowded).
    """
    n = rng.randint(config.min_objects, config.max_objects)
    for _ in range(PLACEMENT_ATTEMPTS):
        # Attributes are redrawn with the positions: a crowd of large objects that does not fit is rare
        # and is replaced by another draw rather than by shrinking objects behind the scene graph's back.
        attributes = [(rng.choice(config.shapes), rng.choice(config.colors), rng.choice(SIZES)) for _ in range(n)]
        widths = [config.large_px if size == "large" else config.small_px for _, _, size in attributes]
        corners = place_boxes(widths, config.image_size, config.gap_px, config.margin_px, rng)
        if corners is not None:
            objects = [
                SceneObject(i, shape, color, size, x0, y0, width)
                for i, ((shape, color, size), (x0, y0), width) in enumerate(zip(attributes, corners, widths))
            ]
            return Scene(config.image_size, config.background, objects, config.spatial_px)
    raise ValueError(
        f"could not place {n} objects without overlap in a {config.image_size} px image after "
        f"{PLACEMENT_ATTEMPTS} attempts; raise image_size or lower max_objects"
    )


def place_boxes(
    widths: list[int], image_size: int, gap: int, margin: int, rng: random.Random
) -> list[tuple[int, int]] | None:
    """Top-left corners for square boxes of `widths`, at least `gap` apart, or None at a dead end.

    Each box is drawn uniformly from all corners still free (an exact mask, not blind retries), so a
    dead end only happens when the boxes placed so far leave no room at all.
    """
    corners: list[tuple[int, int]] = []
    for w in widths:
        n = image_size - 2 * margin - w + 1
        if n <= 0:
            return None
        free = np.ones((n, n), dtype=bool)  # free[y0 - margin, x0 - margin]
        for (px, py), pw in zip(corners, widths):
            # A box at x0 collides when x0 < px + pw + gap and x0 + w + gap > px.
            lo_x, hi_x = max(0, px - w - gap + 1 - margin), min(n, px + pw + gap - margin)
            lo_y, hi_y = max(0, py - w - gap + 1 - margin), min(n, py + pw + gap - margin)
            if lo_x < hi_x and lo_y < hi_y:
                free[lo_y:hi_y, lo_x:hi_x] = False
        candidates = np.flatnonzero(free)
        if len(candidates) == 0:
            return None
        k = int(candidates[rng.randrange(len(candidates))])
        corners.append((k % n + margin, k // n + margin))
    return corners
