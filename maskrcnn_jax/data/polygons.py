"""Exact polygon geometry for the synthetic dataset: areas, half-plane clipping and subtracting convex shapes.

Polygons are float64 arrays [N, 2] of (x, y) vertices in continuous pixel coordinates. Subtracting a convex
polygon C from a polygon P splits P \\ C into convex-edge wedges, one per edge of C, so the result needs no
holes (COCO polygons cannot express holes) and is exact up to floating point.
"""

from __future__ import annotations

import numpy as np

_MIN_PIECE_AREA = 1e-3  # pieces thinner than this are numerical slivers from clipping


def _signed_area(polygon: np.ndarray) -> float:
    """Shoelace formula; positive for counter-clockwise vertices in a y-up frame."""
    if len(polygon) < 3:
        return 0.0
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * float(x[:-1] @ y[1:] - y[:-1] @ x[1:] + x[-1] * y[0] - y[-1] * x[0])


def polygon_area(polygon: np.ndarray) -> float:
    """Unsigned area."""
    return abs(_signed_area(polygon))


def _boxes_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    return bool((a.min(0) < b.max(0)).all() and (b.min(0) < a.max(0)).all())


def clip_to_halfplane(polygon: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """The part of `polygon` where `normal . p + offset >= 0` (Sutherland-Hodgman against one line).

    Works for non-convex polygons too; a result in several pieces stays one ring joined by zero-width
    edges along the line, which encloses no area.
    """
    if len(polygon) == 0:
        return polygon
    side = polygon @ normal + offset
    out = []
    n = len(polygon)
    for i in range(n):
        current, following = polygon[i], polygon[(i + 1) % n]
        s_current, s_following = side[i], side[(i + 1) % n]
        if s_current >= 0:
            out.append(current)
        if (s_current >= 0) != (s_following >= 0):
            t = s_current / (s_current - s_following)
            out.append(current + t * (following - current))
    return np.asarray(out, np.float64).reshape(-1, 2)


def _inward_halfplanes(convex: np.ndarray):
    """(normal, offset) per edge of a convex polygon, oriented so the interior is where the value is >= 0."""
    orientation = 1.0 if _signed_area(convex) > 0 else -1.0
    planes = []
    for i in range(len(convex)):
        a, b = convex[i], convex[(i + 1) % len(convex)]
        edge = b - a
        # cross(edge, p - a) has the polygon's orientation sign for interior points p.
        normal = orientation * np.asarray([-edge[1], edge[0]])
        planes.append((normal, -float(normal @ a)))
    return planes


def clip_to_convex(polygon: np.ndarray, convex: np.ndarray) -> np.ndarray:
    """polygon ∩ convex."""
    for normal, offset in _inward_halfplanes(convex):
        polygon = clip_to_halfplane(polygon, normal, offset)
        if len(polygon) < 3:
            return np.zeros((0, 2))
    return polygon


def subtract_convex(pieces: list[np.ndarray], convex: np.ndarray) -> list[np.ndarray]:
    """(∪ pieces) \\ convex as a list of pieces, dropping slivers.

    Walking the edges of `convex`, the part of what remains that lies outside edge k (and inside edges
    0..k-1) is one output piece; what lies inside every edge is the part that is removed.
    """
    result = []
    remaining = []
    for piece in pieces:
        if polygon_area(piece) <= _MIN_PIECE_AREA:
            continue
        # A piece whose bounding box misses the convex polygon's is untouched by it.
        (remaining if _boxes_overlap(piece, convex) else result).append(piece)
    for normal, offset in _inward_halfplanes(convex):
        next_remaining = []
        for piece in remaining:
            outside = clip_to_halfplane(piece, -normal, -offset)
            if len(outside) >= 3 and polygon_area(outside) > _MIN_PIECE_AREA:
                result.append(outside)
            inside = clip_to_halfplane(piece, normal, offset)
            if len(inside) >= 3 and polygon_area(inside) > _MIN_PIECE_AREA:
                next_remaining.append(inside)
        remaining = next_remaining
        if not remaining:
            break
    return result


def subtract_shape(pieces: list[np.ndarray], convex_parts: list[np.ndarray]) -> list[np.ndarray]:
    """(∪ pieces) minus a shape given as a union of (possibly overlapping) convex parts."""
    for part in convex_parts:
        pieces = subtract_convex(pieces, part)
    return pieces
