"""COCO evaluation: `coco` wraps pycocotools and encodes results; `evaluator.CocoEvaluator` scores any predict
function over the evaluation split."""
