"""benchmarks/memory.py's reading of XLA's live-range dump: every buffer alive at the peak counted once, by the part
of the model its name stack names, forward residuals apart from the backward's own."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)

# The shape of XLA's dump (jax 0.10), with the step's real names; sizes made up.
LIVE_RANGE = """HloLiveRange (max 4500):
  Live ranges at 2478 (peak):
    copy.1{}:1-2
  Stack trace breakdown for peak usage: 1 000 000 000 bytes
    main.564 (100.0%, total: 1 000 000 000 bytes, current: 0 bytes, remaining: 1 000 000 000 bytes)
      ├── jit(train_step)/jvp(MaskRCNN.losses)/MaskRCNN._positive_roi_losses/cond (30.0%, total: 300 000 100 bytes, current: 100 bytes, remaining: 999 999 900 bytes)
      │   └── region_80.234 (30.0%, total: 300 000 000 bytes, current: 0 bytes, remaining: 999 999 900 bytes)
      │       ├── jit(train_step)/jvp(MaskRCNN.losses)/MaskRCNN._positive_roi_losses/cond/branch_3_fun/mask_head/jit(relu)/max (20.0%, total: 200 000 000 bytes, current: 200 000 000 bytes, remaining: 799 999 900 bytes)
      │       └── wrapped_broadcast.123 (10.0%, total: 100 000 000 bytes, current: 100 000 000 bytes, remaining: 699 999 900 bytes)
      ├── jit(train_step)/transpose(jvp(MaskRCNN.losses))/MaskRCNN._proposals/rpn_head/conv/cond/branch_0_fun/conv_general_dilated (9.0%, total: 90 000 000 bytes, current: 90 000 000 bytes, remaining: 609 999 900 bytes)
      ├── jit(train_step)/jvp(MaskRCNN.losses)/MaskRCNN._features/backbone/body/layer1/block_0/jit(relu)/max (40.0%, total: 400 000 000 bytes, current: 400 000 000 bytes, remaining: 209 999 900 bytes)
      ├── jit(train_step)/jvp(MaskRCNN.losses)/MaskRCNN._features/backbone/fpn/fpn_output2/conv_general_dilated (5.0%, total: 50 000 000 bytes, current: 50 000 000 bytes, remaining: 159 999 900 bytes)
      ├── opt_state[0].trace['box_head']['fc6']['kernel'] (5.0%, total: 50 000 000 bytes, current: 50 000 000 bytes, remaining: 109 999 900 bytes)
      └── jit(train_step)/jvp(MaskRCNN.losses)/MaskRCNN._box_features/MaskRCNN._pool/vmap()/add (1.0%, total: 10 000 000 bytes, current: 10 000 000 bytes, remaining: 99 999 900 bytes)
"""


def test_peak_breakdown_by_part_and_phase():
    peak, totals = memory.peak_breakdown(LIVE_RANGE)
    assert peak == 1_000_000_000
    kept = "forward, kept for the backward"
    assert totals == {
        ("mask head (its fixed RoI bucket)", kept): 200_000_100,
        (memory.UNNAMED, ""): 100_000_000,
        ("RPN and proposals", "backward"): 90_000_000,
        ("ResNet body", kept): 400_000_000,
        ("FPN", kept): 50_000_000,
        ("parameters and optimizer state", ""): 50_000_000,
        ("box head and RoI pooling", kept): 10_000_000,
    }


def test_a_dump_without_the_breakdown_is_an_error():
    with pytest.raises(SystemExit, match="no peak breakdown"):
        memory.peak_breakdown("HloLiveRange (max 4500):\n")
