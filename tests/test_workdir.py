"""engine/workdir.py: a workdir's config reads back equal to what was written, and one written before a field existed
reads with that field's default."""

import json
import pathlib

from maskrcnn_jax import config as config_lib
from maskrcnn_jax.engine import workdir

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_config_round_trips_and_old_configs_get_new_fields_defaults(tmp_path):
    config = config_lib.load(ROOT / "configs" / "stick_figures.py")
    workdir.write_config(str(tmp_path), config)
    assert workdir.read_config(str(tmp_path)).to_dict() == config.to_dict()

    saved = json.loads((tmp_path / workdir.CONFIG_FILE).read_text())
    del saved["model"]["backbone"]["kind"], saved["model"]["keypoint_head"], saved["train"]["ema_decay"]
    (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(saved))
    old = workdir.read_config(str(tmp_path))
    assert old.model.backbone.kind == "fpn" and old.train.ema_decay == 0.0
    assert old.model.keypoint_head.num_keypoints == config_lib.base_config().model.keypoint_head.num_keypoints
    assert old.data.canvas_size == (192, 192) and old.model.keypoint_on  # the saved values win
