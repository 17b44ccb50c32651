"""Reading the objects a caption names, to compare them with a scene graph."""

from __future__ import annotations

import json
from collections import Counter

from align.world import COLORS, SHAPES, normalize
from align.world.language import NUMBER_WORDS

# Words outside the world still count as mentions, so a caption naming "a pink star" loses precision.
_EXTRA_COLORS = ("pink", "brown", "cyan", "magenta", "violet", "teal", "gold", "silver", "beige", "navy")
_EXTRA_SHAPES = ("rectangle", "oval", "ellipse", "star", "hexagon", "pentagon", "heart", "cross", "rhombus")
COLOR_WORDS = {c: c for c in (*COLORS, *_EXTRA_COLORS)} | {"grey": "gray"}
SHAPE_WORDS = {s: s for s in (*SHAPES, *_EXTRA_SHAPES)}
SHAPE_WORDS |= {s + "s": s for s in list(SHAPE_WORDS)}
COUNT_WORDS = {w: n for n, w in enumerate(NUMBER_WORDS)} | {"a": 1, "an": 1, "no": 0} | {str(n): n for n in range(100)}
SIZE_WORDS = {"small", "large", "big", "tiny", "little", "huge"}


def caption_objects(caption: str) -> Counter:
    """The multiset of (color, shape) pairs a caption names: "a red circle and two blue squares" ->
    {("red", "circle"): 1, ("blue", "square"): 2}.

    A shape word is read with the count, size and color words right before it; a shape named without
    a color gives (None, shape), which matches no object. A plural without a number counts as two.
    """
    tokens = normalize(caption)
    found: Counter = Counter()
    for i, token in enumerate(tokens):
        if token not in SHAPE_WORDS:
            continue
        shape = SHAPE_WORDS[token]
        color, count = None, None
        j = i - 1
        while j >= 0 and (tokens[j] in COLOR_WORDS or tokens[j] in SIZE_WORDS or tokens[j] in COUNT_WORDS):
            if tokens[j] in COLOR_WORDS and color is None:
                color = COLOR_WORDS[tokens[j]]
            elif tokens[j] in COUNT_WORDS and count is None:
                count = COUNT_WORDS[tokens[j]]
            j -= 1
        if count is None:
            count = 1 if token == shape else 2
        if count > 0:
            found[(color, shape)] += count
    return found


def scene_objects(scene) -> Counter:
    """The multiset of (color, shape) pairs of a scene graph (a dict or its JSON)."""
    scene = json.loads(scene) if isinstance(scene, str) else scene
    return Counter((o["color"], o["shape"]) for o in scene["objects"])
