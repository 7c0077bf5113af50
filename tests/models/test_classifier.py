from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from cxr_triage.models.classifier import (
    CheckpointError,
    build_classifier,
    class_activation_map,
    load_classifier_weights,
    read_checkpoint,
)
from cxr_triage.models.registry import CHESTXRAY14_LABELS, XRV_PATHOLOGIES


def _x(channels: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, size, size, generator=g)


def _same(a: torch.nn.Module, b: torch.nn.Module, channels: int) -> None:
    x = _x(channels)
    with torch.no_grad():
        pa, fa = a.eval()(x)
        pb, fb = b.eval()(x)
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    torch.testing.assert_close(fa, fb, rtol=0, atol=0)


def test_xrv_layout_and_key_names() -> None:
    m = build_classifier("densenet121-xrv")
    keys = set(m.state_dict())
    # torchxrayvision's DenseNet key names
    for k in ("features.conv0.weight", "features.norm0.running_mean", "features.denseblock1.denselayer1.norm1.weight",
              "features.denseblock4.denselayer16.conv2.weight", "features.transition3.conv.weight",
              "features.norm5.bias", "classifier.weight", "classifier.bias"):
        assert k in keys, k
    assert m.features.conv0.in_channels == 1 and m.classifier.out_features == len(XRV_PATHOLOGIES) == 18
    probs, feats = m.eval()(torch.zeros(1, 1, 224, 224))
    assert probs.shape == (1, 18) and feats.shape == (1, 1024, 7, 7)


def test_xrv_state_dict_with_op_threshs_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = build_classifier("densenet121-xrv")
    src.op_threshs = torch.rand(18)
    torch.save(src.state_dict(), tmp_path / "xrv.pt")
    assert "op_threshs" in torch.load(tmp_path / "xrv.pt", weights_only=True)
    dst = load_classifier_weights(build_classifier("densenet121-xrv"), tmp_path / "xrv.pt",
                                  architecture="densenet121-xrv")
    assert torch.equal(dst.op_threshs, src.op_threshs)
    # strict=True works on our module directly (exact xrv structure)
    fresh = build_classifier("densenet121-xrv")
    fresh.op_threshs = torch.zeros(18)
    fresh.load_state_dict(torch.load(tmp_path / "xrv.pt", weights_only=True), strict=True)
    _same(src, dst, 1)


def _old_style(sd: dict) -> dict:
    return {re.sub(r"\.(norm|relu|conv)(\d)\.", r".\1.\2.", k): v for k, v in sd.items()}


@pytest.mark.parametrize("form", ["arnoweng", "plain-linear", "reproduce-state-dict"])
def test_chexnet_formats(tmp_path: Path, form: str) -> None:
    torch.manual_seed(2)
    tv = torchvision.models.densenet121(num_classes=14)
    if form != "plain-linear":
        tv.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())
    sd = tv.state_dict()
    if form == "arnoweng":  # DataParallel(DenseNet121 wrapper), old torchvision names, {"state_dict": ...}
        obj = {"epoch": 3, "best_loss": 0.1, "state_dict": {"module.densenet121." + k: v for k, v in _old_style(sd).items()}}
    elif form == "plain-linear":
        obj = sd
    else:
        obj = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    torch.save(obj, tmp_path / "c.pth.tar")
    dst = load_classifier_weights(build_classifier("densenet121-chexnet"), tmp_path / "c.pth.tar",
                                  architecture="densenet121-chexnet")
    assert dst.classifier.out_features == len(CHESTXRAY14_LABELS)
    x = _x(3)
    with torch.no_grad():
        ref = tv.eval()(x)
        if form == "plain-linear":
            ref = torch.sigmoid(ref)
        probs, _ = dst(x)
    torch.testing.assert_close(probs, ref, rtol=0, atol=1e-6)


def test_pickled_whole_model_needs_allow_pickle(tmp_path: Path) -> None:
    torch.manual_seed(4)
    tv = torchvision.models.densenet121(num_classes=14)
    tv.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())
    torch.save({"model": tv, "best_loss": 0.2, "epoch": 1}, tmp_path / "checkpoint")  # reproduce-chexnet
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        read_checkpoint(tmp_path / "checkpoint")
    dst = load_classifier_weights(build_classifier("densenet121-chexnet"), tmp_path / "checkpoint",
                                  architecture="densenet121-chexnet", allow_pickle=True)
    x = _x(3)
    with torch.no_grad():
        torch.testing.assert_close(dst(x)[0], tv.eval()(x), rtol=0, atol=1e-6)


def test_resnet50_xrv_layout(tmp_path: Path) -> None:
    torch.manual_seed(5)
    src = build_classifier("resnet50-xrv")
    assert "model.conv1.weight" in src.state_dict() and "model.fc.weight" in src.state_dict()
    torch.save({"state_dict": src.state_dict()}, tmp_path / "r.pt")
    dst = load_classifier_weights(build_classifier("resnet50-xrv"), tmp_path / "r.pt", architecture="resnet50-xrv")
    x = _x(1, size=64)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x)[0], src.eval()(x)[0], rtol=0, atol=0)


def test_truncated_and_garbage_checkpoints(tmp_path: Path) -> None:
    m = build_classifier("densenet121-xrv")
    torch.save(m.state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) - 5000])
    (tmp_path / "g.pt").write_bytes(b"not a checkpoint at all")
    for name in ("t.pt", "g.pt"):
        with pytest.raises(CheckpointError, match="truncated or corrupted|cannot read") as err:
            load_classifier_weights(build_classifier("densenet121-xrv"), tmp_path / name, architecture="densenet121-xrv")
        assert "Traceback" not in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def test_cam_is_exact_decomposition_of_the_logit() -> None:
    torch.manual_seed(6)
    m = build_classifier("densenet121-xrv").eval()
    with torch.no_grad():
        probs, feats = m(_x(1)[:1])
    w = m.classifier.weight[8].detach().numpy()
    f = feats[0].numpy()
    logit = float(np.tensordot(w, f, axes=(0, 0)).mean() + float(m.classifier.bias[8]))
    assert abs(1 / (1 + np.exp(-logit)) - float(probs[0, 8])) < 1e-5
    cam = class_activation_map(f, w)
    assert cam.shape == (2, 2) and cam.min() >= 0 and cam.max() <= 1
