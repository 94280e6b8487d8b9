"""COCO's category ids and names, for models imported from COCO checkpoints (their label maps travel with the
workdir as categories.json, so prediction names classes without the dataset)."""

from maskrcnn_jax.convert.finetune import COCO_CATEGORY_IDS
from maskrcnn_jax.data.coco_format import CategoryMap
from maskrcnn_jax.data.keypoints import KeypointSchema

COCO_CATEGORY_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
UNUSED_SLOT_NAME = "N/A"

# COCO's person keypoints (person_keypoints_*.json): names, skeleton (the JSON's 1-based pairs, made 0-based) and
# pycocotools' default OKS sigmas.
COCO_PERSON_KEYPOINTS = KeypointSchema(
    names=("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
           "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
           "left_ankle", "right_ankle"),
    skeleton=tuple((a - 1, b - 1) for a, b in (
        (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9), (8, 10),
        (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))),
    oks_sigmas=(0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087,
                0.087, 0.089, 0.089),
    category_ids=(1,),
)


def coco_category_map(num_classes: int) -> CategoryMap | None:
    """The label map of a COCO model with `num_classes` outputs (background included): 91 is torchvision's layout
    (label k is category id k; the 10 ids COCO never used are named N/A), 81 the contiguous 80 labels of our
    pipeline and detectron2, 2 the person of COCO's keypoint models. None for any other size."""
    if num_classes == 2:
        return CategoryMap((1,), ("person",))
    if num_classes == 81:
        return CategoryMap(COCO_CATEGORY_IDS, COCO_CATEGORY_NAMES)
    if num_classes == 91:
        names = dict(zip(COCO_CATEGORY_IDS, COCO_CATEGORY_NAMES))
        return CategoryMap(tuple(range(1, 91)), tuple(names.get(i, UNUSED_SLOT_NAME) for i in range(1, 91)))
    return None
