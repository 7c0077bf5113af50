"""Detector: output shapes, anchor layout, checkpoint loading, ONNX export equivalence."""

import time

import numpy as np
import pytest
import torch

from cxr_triage.models.detector import (
    ASPECT_RATIOS,
    DETECTOR_OUTPUT_NAMES,
    GLOBAL_CLASSES,
    build_detector,
    detector_anchors,
    load_detector_checkpoint,
)

torch.set_num_threads(2)


def _export_and_compare(model, size, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    path = tmp_path / "det.onnx"
    torch.onnx.export(
        model, (x,), str(path), input_names=["image"], output_names=list(DETECTOR_OUTPUT_NAMES),
        dynamo=False, opset_version=17, dynamic_axes={"image": {0: "batch"}},
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == list(DETECTOR_OUTPUT_NAMES)
    got = sess.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    for g, r in zip(got, ref):
        r = r.numpy()
        assert g.shape == r.shape
        assert np.abs(g - r).max() <= 1e-4 * max(1.0, np.abs(r).max())


def test_global_classes_and_output_names():
    assert GLOBAL_CLASSES[2] == "Lung Opacity" and len(GLOBAL_CLASSES) == 3
    assert DETECTOR_OUTPUT_NAMES == ("cls_logits", "bbox_regression", "global_logits")


@pytest.mark.parametrize("backbone,size", [("tiny", 128), ("tiny", 64), ("resnet50", 512)])
def test_output_shapes_match_anchor_count(backbone, size):
    model = build_detector(backbone=backbone, image_size=size).eval()
    with torch.no_grad():
        cls, reg, glob = model(torch.zeros(2, 3, size, size))
    anchors = detector_anchors(image_size=size, backbone=backbone)
    A = anchors.shape[0]
    assert cls.shape == (2, A, 1) and reg.shape == (2, A, 4) and glob.shape == (2, 3)
    assert anchors.dtype == np.float32
    if backbone == "resnet50":
        # P3..P7 at 512: (64^2 + 32^2 + 16^2 + 8^2 + 4^2) positions x 9 anchors
        assert A == (64**2 + 32**2 + 16**2 + 8**2 + 4**2) * 9 == 49104


def test_anchors_match_torchvision_generator():
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    for small in (True, False):
        model = build_detector(backbone="tiny", image_size=128, small_anchors=small).eval()
        x = torch.zeros(1, 3, 128, 128)
        with torch.no_grad():
            feats = model.features(x)
        gen = AnchorGenerator(model.config.anchor_sizes(), (ASPECT_RATIOS,) * len(feats))
        tv = gen(ImageList(x, [(128, 128)]), feats)[0].numpy()
        np.testing.assert_array_equal(tv, detector_anchors(image_size=128, small_anchors=small, backbone="tiny"))
    small = detector_anchors(image_size=512, small_anchors=True)
    big = detector_anchors(image_size=512, small_anchors=False)
    area = lambda a: (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])  # noqa: E731
    assert area(small).min() < area(big).min()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="backbone"):
        build_detector(backbone="vgg")
    with pytest.raises(ValueError, match="image_size"):
        build_detector(image_size=500)


def test_checkpoint_roundtrip_and_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    model = build_detector(backbone="tiny", image_size=64).eval()
    ckpt = {"model": model.state_dict(), "config": {"backbone": "tiny", "image_size": 64}, "epoch": 3}
    torch.save(ckpt, tmp_path / "c.pt")
    loaded = load_detector_checkpoint(tmp_path / "c.pt")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            torch.testing.assert_close(a, b)

    # a torchvision RetinaNet state dict (91 COCO classes): backbone/FPN/regression weights load, shapes
    # that differ (class logits) are skipped.
    from torchvision.models.detection import retinanet_resnet50_fpn

    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    det = load_detector_checkpoint(tmp_path / "tv.pth", backbone="resnet50", small_anchors=False)
    sd = det.state_dict()
    key = "head.regression_head.bbox_reg.weight"
    torch.testing.assert_close(sd[key], tv.state_dict()[key])
    torch.testing.assert_close(sd["backbone.body.conv1.weight"], tv.state_dict()["backbone.body.conv1.weight"])

    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        load_detector_checkpoint(tmp_path / "bad.pt")


def test_onnx_export_tiny_matches_torch(tmp_path):
    _export_and_compare(build_detector(backbone="tiny", image_size=128).eval(), 128, tmp_path)


def test_onnx_export_resnet50_512_matches_torch(tmp_path):
    t0 = time.perf_counter()
    _export_and_compare(build_detector(backbone="resnet50", image_size=512).eval(), 512, tmp_path)
    assert time.perf_counter() - t0 < 60
