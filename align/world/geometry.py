"""Where a scene's objects fall in a vision tower's patch grid."""

from __future__ import annotations


def object_patch(obj, scene_size: int, image_size: int, patch_size: int) -> int:
    """Index in a tower's patch grid (row-major) of the patch holding a pixel inside `obj`'s shape, for a scene
    rendered at `scene_size` px and a tower that sees `image_size` px in `patch_size` px patches."""
    x, y = (min(int(v * image_size / scene_size), image_size - 1) for v in obj.center_pixel)
    return (y // patch_size) * (image_size // patch_size) + x // patch_size
