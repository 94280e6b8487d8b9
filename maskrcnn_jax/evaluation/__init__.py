"""COCO evaluation: `coco` wraps pycocotools and encodes results; `evaluator.CocoEvaluator` scores any predict
function over the evaluation split; `host_pool` runs the per-image host work in `host_worker` processes, which
hand back `result_arrays`."""
