"""What the torchvision parity tests and benchmarks/parity_speed.py share (not a test module): the photographs, the
seeded randomisation of a torchvision detection model's weights, and the agreement of two sets of detections."""

import numpy as np

TOP = 50


def grace_hopper():
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        return np.array(image.convert("RGB"))


def randomize_torchvision_model(torch, model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in model.backbone.body.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("running_mean"):
                buffer.normal_(0.0, 0.2, generator=generator)
        for name, parameter in model.named_parameters():
            is_norm = name.startswith("backbone.body.") and parameter.ndim == 1
            if is_norm and name.endswith("weight"):
                parameter.uniform_(0.5, 1.5, generator=generator)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.2 if is_norm else 0.05, generator=generator)


def photographs():
    """{name: uint8 H x W x 3}: landscape, portrait, small and larger-than-the-canvas photographs. With
    torchvision's 800 / 1333 resize and padding to 32 they run on three canvases (three compiles): 960 x 800
    (grace_hopper, 600 x 512), 800 x 1216 (the landscapes: rocket at 427 x 640, where the scale 800 / 427 is not a
    round number; a small 150 x 225 crop of chelsea; coffee enlarged 3x to 1200 x 1800, beyond the 1344 x 1344
    training canvas) and 1280 x 800 (a 512 x 320 portrait crop of astronaut). scikit-image ships the three."""
    from PIL import Image

    from skimage import data
    return {
        "grace_hopper": grace_hopper(),
        "rocket": data.rocket(),
        "chelsea_crop": np.ascontiguousarray(data.chelsea()[60:210, 100:325]),
        "coffee_3x": np.asarray(Image.fromarray(data.coffee()).resize((1800, 1200), Image.BILINEAR)),
        "astronaut_portrait": np.ascontiguousarray(data.astronaut()[:, 100:420]),
    }


def torchvision_predictions(torch, model, photos):
    """{name: model([photo])[0] as NumPy arrays}: torchvision's own inference on each uint8 photograph."""
    predictions = {}
    with torch.no_grad():
        for name, photo in photos.items():
            output = model([torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255])[0]
            predictions[name] = {key: value.numpy() for key, value in output.items()}
    return predictions


def compare_detections(expected, actual, top=TOP):
    """Agreement of the top `top` detections of torchvision's model([photo]) (labels, scores, boxes, masks > 0.5)
    and ours: {'labels_agree', 'max_score_diff', 'max_box_diff', 'median_mask_iou', 'min_mask_iou',
    'nonempty_masks'}."""
    count = min(top, len(expected["scores"]), len(actual["scores"]))
    expected_masks = expected["masks"][:count]
    if expected_masks.ndim == 4:  # torchvision's [N, 1, H, W] probabilities, binarised as its evaluation does
        expected_masks = expected_masks[:, 0] > 0.5
    actual_masks = actual["masks"][:count]
    intersection = (expected_masks & actual_masks).sum((1, 2))
    union = (expected_masks | actual_masks).sum((1, 2))
    # Random weights leave some masks below 0.5 everywhere: empty on both sides counts as agreement.
    iou = np.where(union > 0, intersection / np.maximum(union, 1), 1.0)
    return {
        "count": count,
        "labels_agree": float(np.mean(expected["labels"][:count] == actual["labels"][:count])),
        "max_score_diff": float(np.abs(expected["scores"][:count] - actual["scores"][:count]).max()),
        "max_box_diff": float(np.abs(expected["boxes"][:count] - actual["boxes"][:count]).max()),
        "median_mask_iou": float(np.median(iou)),
        "min_mask_iou": float(iou.min()),
        "nonempty_masks": int((union > 0).sum()),
    }
