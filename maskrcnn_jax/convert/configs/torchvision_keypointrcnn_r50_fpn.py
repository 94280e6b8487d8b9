r"""torchvision's keypointrcnn_resnet50_fpn (COCO_V1: 65.0 keypoint AP, 54.6 box AP) with every setting its model
uses: torchvision's Mask R-CNN settings (torchvision_maskrcnn_r50_fpn.py: the resize, FPN, RPN, RoIAlign and
detection thresholds are the same), with two classes (background and person), no mask branch, and the keypoint
branch: MultiScaleRoIAlign at 14 x 14, 8 convs of 512, a 4x4 stride-2 transposed conv and bilinear x2 to 56 x 56
heatmaps of COCO's 17 keypoints, decoded as torchvision's heatmaps_to_keypoints does.

    python -m maskrcnn_jax.convert --from=torchvision keypointrcnn_resnet50_fpn_coco-fc266e95.pth --out=WORKDIR
"""

from maskrcnn_jax.convert.configs.torchvision_maskrcnn_r50_fpn import get_config as torchvision_maskrcnn_config


def get_config():
    config = torchvision_maskrcnn_config()
    m = config.model
    m.num_classes = 2
    m.mask_on = False
    m.keypoint_on = True
    k = m.keypoint_head
    k.num_keypoints = 17
    k.conv_dim = 512
    k.num_convs = 8
    k.pool_size = 14
    k.loss_normalization = "visible"  # torchvision's keypointrcnn_loss: the mean over valid keypoints
    k.loss_weight = 1.0
    config.data.name = "coco2017_keypoints"
    return config
