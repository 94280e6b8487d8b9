"""Inference time of the parity run: torchvision's maskrcnn_resnet50_fpn and ours with its converted weights, on the
photograph tests/test_convert_torchvision.py uses (matplotlib's grace_hopper.jpg, 600 x 512 -> 937 x 800 input).

    .venv/bin/python benchmarks/parity_speed.py           # prints the table
    .venv/bin/python benchmarks/parity_speed.py --write   # and rewrites its section of RESULTS.md

Both sides run batch 1, float32, eval mode, steady state (median of several runs after one warm-up; our compile time
is reported apart). Rows:
  * network: the model on the preprocessed tensor (torchvision: backbone + RPN + RoI heads; ours: the jitted
    `MaskRCNN.predict` on the same 960 x 800 padded input);
  * ours on the 1344 x 1344 canvas of configs/torchvision_maskrcnn_r50_fpn.py, the fixed shape a static-shape
    pipeline compiles once for every COCO image;
  * end to end: torchvision's `model([image])` against our `Predictor(image)` on the uint8 photograph, i.e. also
    the resize, normalisation, box mapping and mask pasting of each.
Random weights with randomised BatchNorm statistics (as in the parity test) make the detections real ones (100,
scores near 1), so both sides do the full amount of work.
"""

import argparse
import importlib.util
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from timing import machine_line, median_seconds, time_jax, write_section  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_test_module():
    """The parity test's photo loader and randomisation, so both measure the very same model and input."""
    path = REPO / "tests" / "test_convert_torchvision.py"
    spec = importlib.util.spec_from_file_location("test_convert_torchvision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="rewrite the parity_speed section of RESULTS.md")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    import torchvision

    from maskrcnn_jax.convert import from_torchvision
    from maskrcnn_jax.convert.coco_categories import coco_category_map
    from maskrcnn_jax.convert.configs import default_config
    from maskrcnn_jax.inference import Predictor
    from maskrcnn_jax.modeling.mask_rcnn import build_model

    parity = load_test_module()
    torch.manual_seed(0)
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    parity.randomize_torchvision_model(torch, reference)
    photo = torch.from_numpy(parity.grace_hopper()).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        image_list, _ = reference.transform([photo])

    def torch_network():
        with torch.no_grad():
            features = reference.backbone(image_list.tensors)
            proposals, _ = reference.rpn(image_list, features)
            return reference.roi_heads(features, proposals, image_list.image_sizes)

    def torch_end_to_end():
        with torch.no_grad():
            return reference([photo])

    config = default_config("torchvision")
    model = build_model(config.model)
    variables = jax.device_put(from_torchvision(reference.state_dict()))
    predict = lambda v, x, s: model.apply(v, x, s, method=model.predict)  # noqa: E731
    images = jnp.asarray(image_list.tensors.numpy().transpose(0, 2, 3, 1))
    sizes = jnp.asarray(image_list.image_sizes, jnp.int32)
    canvas = tuple(config.data.canvas_size)
    big = jnp.zeros((1, *canvas, 3), jnp.float32).at[:, : images.shape[1], : images.shape[2]].set(images)

    rows = []
    torch_seconds = median_seconds(torch_network, repeats=args.repeats)
    compile_seconds, ours_seconds = time_jax(predict, variables, images, sizes, repeats=args.repeats)
    rows.append((f"network, {images.shape[1]}x{images.shape[2]} input", torch_seconds, ours_seconds, compile_seconds))
    compile_big, ours_big = time_jax(predict, variables, big, sizes, repeats=args.repeats)
    rows.append((f"ours on the {canvas[0]}x{canvas[1]} config canvas", torch_seconds, ours_big, compile_big))
    end_to_end = median_seconds(torch_end_to_end, repeats=args.repeats)
    # Ours end to end: the Predictor on the uint8 photograph (host resize, network, box mapping, mask pasting), on
    # the 960 x 800 canvas the parity test uses.
    config.data.canvas_size = tuple(images.shape[1:3])
    predictor = Predictor(config, variables, coco_category_map(config.model.num_classes))
    photo_uint8 = parity.grace_hopper()
    predict_photo = lambda: predictor(photo_uint8, score_threshold=0.0)  # noqa: E731
    start = time.perf_counter()
    predict_photo()  # compiles
    compile_predictor = time.perf_counter() - start
    ours_end_to_end = median_seconds(predict_photo, repeats=args.repeats)
    rows.append(("end to end: `model([image])` vs `Predictor(image)` (resize, network, pasting)", end_to_end,
                 ours_end_to_end, compile_predictor))

    lines = [
        "## Parity run: torchvision maskrcnn_resnet50_fpn vs ours with converted weights (grace_hopper.jpg)",
        "",
        f"`.venv/bin/python benchmarks/parity_speed.py --write` on {machine_line()}.",
        "",
        "| what | torchvision (s) | ours (s) | ours / torchvision | our compile (s) |",
        "|---|---|---|---|---|",
    ]
    for name, theirs, ours, compile_time in rows:
        lines.append(f"| {name} | {theirs:.3f} | {ours:.3f} | {ours / theirs:.2f} | {compile_time:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("parity_speed", text)


if __name__ == "__main__":
    main()
