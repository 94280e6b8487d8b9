"""A dataset's keypoint types: names, skeleton, OKS sigmas, and the left/right swap of a horizontal flip.

Plain Python; no TensorFlow. One `KeypointSchema` serves a whole dataset (COCO-format datasets name their
keypoints per category; every category that has keypoints must name the same ones, see
coco_format.load_coco_annotations). K = `num_keypoints`, and keypoint arrays are [..., K, 3] (x, y, v) in the
order of `names`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

LEFT_PREFIX, RIGHT_PREFIX = "left_", "right_"


@dataclasses.dataclass(frozen=True)
class KeypointSchema:
    """The keypoint types of a dataset.

    names         K unique names, in the order of the keypoint arrays
    skeleton      pairs of 0-based indices into `names` (COCO's JSON is 1-based; that stays at the boundary)
    oks_sigmas    K per-keypoint OKS sigmas (pycocotools' `kpt_oks_sigmas`), or None when the dataset gives none
                  (pycocotools then uses COCO's 17 person sigmas)
    category_ids  the dataset categories whose annotations carry these keypoints
    """

    names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...] = ()
    oks_sigmas: tuple[float, ...] | None = None
    category_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.names:
            raise ValueError("a keypoint schema needs at least one keypoint name")
        duplicates = sorted({n for n in self.names if self.names.count(n) > 1})
        if duplicates:
            raise ValueError(f"keypoint names must be unique, {duplicates} repeat")
        for pair in self.skeleton:
            if len(pair) != 2 or not all(isinstance(i, int) and 0 <= i < len(self.names) for i in pair):
                raise ValueError(f"skeleton edge {pair} is not a pair of indices into the {len(self.names)} names")
        if self.oks_sigmas is not None:
            if len(self.oks_sigmas) != len(self.names) or not all(s > 0 for s in self.oks_sigmas):
                raise ValueError(f"oks_sigmas must be {len(self.names)} positive numbers, got {self.oks_sigmas}")

    @property
    def num_keypoints(self) -> int:
        """K."""
        return len(self.names)

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "skeleton": [list(p) for p in self.skeleton],
                "oks_sigmas": None if self.oks_sigmas is None else list(self.oks_sigmas),
                "category_ids": list(self.category_ids)}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> "KeypointSchema":
        sigmas = entry.get("oks_sigmas")
        return cls(names=tuple(str(n) for n in entry["names"]),
                   skeleton=tuple((int(a), int(b)) for a, b in entry.get("skeleton", ())),
                   oks_sigmas=None if sigmas is None else tuple(float(s) for s in sigmas),
                   category_ids=tuple(int(c) for c in entry.get("category_ids", ())))


def flip_permutation(names: Sequence[str], flip_map: Iterable[Sequence[str]] = ()) -> tuple[int, ...]:
    """Index permutation `p` of a horizontal flip: flipped[..., i, :] = original[..., p[i], :].

    `flip_map` lists (name, mirrored name) pairs; names in no pair keep their index. When it is empty the
    pairs are derived from the names: `left_X` pairs with `right_X`, and a `left_X` or `right_X` without its
    partner is an error (a flip would otherwise silently leave it on the wrong side).
    """
    names = list(names)
    index = {name: i for i, name in enumerate(names)}
    pairs = [tuple(pair) for pair in flip_map]
    if not pairs:
        for name in names:
            for own, other in ((LEFT_PREFIX, RIGHT_PREFIX), (RIGHT_PREFIX, LEFT_PREFIX)):
                if name.startswith(own):
                    partner = other + name[len(own):]
                    if partner not in index:
                        raise ValueError(
                            f"keypoint '{name}' has no '{partner}' to swap with in a horizontal flip (keypoints: "
                            f"{names}); give the pairs explicitly (data.keypoint_flip_map) or turn off "
                            "data.random_flip")
                    if own == LEFT_PREFIX:
                        pairs.append((name, partner))
    permutation = list(range(len(names)))
    paired = set()
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"keypoint flip map entry {pair} is not a (name, mirrored name) pair")
        for name in pair:
            if name not in index:
                raise ValueError(f"keypoint flip map names '{name}', which is not a keypoint of this dataset "
                                 f"({names})")
            if name in paired:
                raise ValueError(f"keypoint '{name}' appears in more than one flip-map pair")
            paired.add(name)
        a, b = index[pair[0]], index[pair[1]]
        permutation[a], permutation[b] = b, a
    return tuple(permutation)
