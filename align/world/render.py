"""Rendering a scene graph to a Pillow image."""

from __future__ import annotations

from PIL import Image, ImageDraw

from .scene import COLORS, Scene, SceneObject


def _shape_outline(obj: SceneObject) -> list[tuple[float, float]] | None:
    # Pillow boxes are inclusive, hence the -1 on the far edges.
    x0, y0, x1, y1 = obj.x0, obj.y0, obj.x1 - 1, obj.y1 - 1
    mid_x, mid_y = (x0 + x1) / 2, (y0 + y1) / 2
    if obj.shape == "triangle":
        return [(mid_x, y0), (x1, y1), (x0, y1)]
    if obj.shape == "diamond":
        return [(mid_x, y0), (x1, mid_y), (mid_x, y1), (x0, mid_y)]
    return None


def render(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image: filled shapes on a plain background, no antialiasing.

    Pixels are exact palette colors, so a pixel inside an object has exactly that object's color.
    """
    image = Image.new("RGB", (scene.image_size, scene.image_size), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLORS[obj.color]
        box = [obj.x0, obj.y0, obj.x1 - 1, obj.y1 - 1]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            outline = _shape_outline(obj)
            if outline is None:
                raise ValueError(f"cannot draw shape {obj.shape!r}")
            draw.polygon(outline, fill=fill)
    return image
