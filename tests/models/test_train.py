"""Training: loss decreases, checkpoint/resume, patient-level folds, consistent augmentation, label parsing."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_triage.models import datasets as ds
from cxr_triage.models.detector import build_detector, load_detector_checkpoint
from cxr_triage.models.postprocess import box_iou
from cxr_triage.models.train import (
    DetectionLoss,
    TrainConfig,
    load_training_state,
    make_optimizer,
    train,
    train_step,
)



@pytest.fixture(autouse=True)
def _one_thread():
    """2 spinning OpenMP threads collapse when the 2-core machine is shared; 1 thread is predictable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
NIH = SHARED / "nih-cxr14"


def _batch(size=64, n=2):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(0, 0.1, (n, 3, size, size)).astype(np.float32))
    boxes = [torch.tensor([[10.0, 12.0, 34.0, 40.0]]), torch.zeros((0, 4))]
    x[0, :, 12:40, 10:34] += 1.5
    return x, boxes[:n], torch.tensor([2, 0][:n])


def test_vectorised_loss_equals_torchvision_retinanet_loss():
    torch.manual_seed(0)
    model = build_detector(backbone="tiny", image_size=64)
    x, boxes, classes = _batch()
    boxes = [torch.tensor([[10.0, 12.0, 34.0, 40.0], [40, 40, 60, 62]]), torch.zeros((0, 4))]
    for kind in ("smooth_l1", "giou", "l1"):
        loss_fn = DetectionLoss(model, box_loss=kind)
        out = model(x)
        ours = loss_fn(out, boxes, classes)
        ref = loss_fn.torchvision_reference(out, boxes)
        torch.testing.assert_close(ours["classification"], ref["classification"])
        torch.testing.assert_close(ours["bbox_regression"], ref["bbox_regression"])
    with pytest.raises(ValueError):
        DetectionLoss(model, box_loss="mse")


def test_few_iterations_reduce_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_detector(backbone="tiny", image_size=64)
    loss_fn = DetectionLoss(model)
    opt = make_optimizer(model, lr=1e-3)
    x, boxes, classes = _batch()
    losses = [train_step(model, loss_fn, opt, x, boxes, classes, torch.device("cpu"))["loss"] for _ in range(25)]
    assert losses[-1] < 0.6 * losses[0], losses


def _write_png_dataset(root: Path, n: int = 8) -> tuple[Path, Path]:
    img_dir = root / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pid = f"patient-{i:03d}"
        a = (rng.uniform(40, 90, (96, 80))).astype(np.uint8)
        if i % 2 == 0:
            a[20:50, 15:45] = 220
            rows.append([pid, 15, 20, 30, 30, 1])
            rows.append([pid, 50, 60, 20, 20, 1])
        else:
            rows.append([pid, "", "", "", "", 0])
        Image.fromarray(a).save(img_dir / f"{pid}.png")
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        w.writerows(rows)
    return img_dir, labels


def test_train_checkpoints_and_resume(tmp_path):
    img_dir, labels = _write_png_dataset(tmp_path)
    cfg = TrainConfig(images=str(img_dir), labels=str(labels), out_dir=str(tmp_path / "run"), backbone="tiny",
                      image_size=64, n_folds=4, fold=1, epochs=1, batch_size=2, lr=1e-3, threads=1)
    r1 = train(cfg, progress=False, log=lambda s: None)
    assert r1.epochs_done == 1 and r1.iterations == 3  # 6 training images (2 patients held out) / batch 2
    assert (tmp_path / "run" / "epoch_001.pt").is_file() and r1.checkpoint.is_file()
    state1 = torch.load(r1.checkpoint, weights_only=True)
    assert state1["fold"] == 1 and state1["epoch"] == 1 and "val_loss" in state1["metrics"]

    # resume: epoch/iteration continue, optimizer + scheduler state restored
    model = build_detector(backbone="tiny", image_size=64)
    opt = make_optimizer(model, lr=1e-3)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=4, factor=0.2)
    load_training_state(r1.checkpoint, model, opt, sched)
    restored = opt.state_dict()["state"]
    saved = state1["optimizer"]["state"]
    assert restored.keys() == saved.keys() and len(saved) > 0
    k = next(iter(saved))
    torch.testing.assert_close(restored[k]["exp_avg"], saved[k]["exp_avg"])
    assert restored[k]["step"] == saved[k]["step"] == 3

    cfg2 = TrainConfig(**{**cfg.__dict__, "epochs": 2, "resume": str(r1.checkpoint)})
    r2 = train(cfg2, progress=False, log=lambda s: None)
    assert r2.epochs_done == 2 and r2.iterations == 6
    state2 = torch.load(r2.checkpoint, weights_only=True)
    k2 = next(iter(state2["optimizer"]["state"]))
    assert state2["optimizer"]["state"][k2]["step"] == 6

    # the checkpoint is what load_detector_checkpoint (and `models import --format detector`) takes
    det = load_detector_checkpoint(r2.checkpoint, global_classes=["Normal", "No Lung Opacity / Not Normal",
                                                                  "Lung Opacity"], output_names=["x"])
    assert det.config.backbone == "tiny" and det.config.image_size == 64
    with pytest.raises(ValueError, match="conflicting"):
        load_detector_checkpoint(r2.checkpoint, image_size=512)

    # max_iterations stops early
    cfg3 = TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "run3"), "epochs": 5, "max_iterations": 2})
    assert train(cfg3, progress=False, log=lambda s: None).iterations == 2


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.mkdir(marker): the stand-in for any code a hostile checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.mkdir, (str(self.marker),))


def test_resume_refuses_a_checkpoint_with_pickled_objects(tmp_path):
    from cxr_triage.models.detector import CHECKPOINT_FORMAT
    from cxr_triage.models.train import save_checkpoint

    model = build_detector(backbone="tiny", image_size=64)
    good = save_checkpoint(tmp_path / "good.pt", model=model, epoch=1)
    state = torch.load(good, weights_only=True)
    marker = tmp_path / "code-ran"
    state["train_config"] = {"payload": _RunsCodeWhenUnpickled(marker)}
    assert state["format"] == CHECKPOINT_FORMAT
    evil = tmp_path / "evil.pt"
    torch.save(state, evil)
    with pytest.raises(ValueError, match="refusing to resume.*pickled Python objects"):
        load_training_state(evil, build_detector(backbone="tiny", image_size=64))
    assert not marker.exists()  # refused before any of its code ran
    # a truncated file: a clear message too, not a torch traceback
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a loadable training checkpoint"):
        load_training_state(trunc, build_detector(backbone="tiny", image_size=64))
    # and the well-formed one still resumes
    assert load_training_state(good, build_detector(backbone="tiny", image_size=64))["epoch"] == 1
    # the payload is live: an unrestricted load runs it (what weights_only=False in resume used to do)
    torch.load(evil, weights_only=False)
    assert marker.is_dir()


def test_patient_level_folds():
    pids = [f"p{i}" for i in range(50)]
    folds = ds.patient_folds(pids + pids[:10], 5, seed=3)  # duplicates collapse to one assignment
    assert set(folds) == set(pids)
    sizes = np.bincount(list(folds.values()), minlength=5)
    assert sizes.max() - sizes.min() <= 1
    assert folds == ds.patient_folds(list(reversed(pids)), 5, seed=3)  # order-independent, deterministic
    assert folds != ds.patient_folds(pids, 5, seed=4)
    items = [(Path(f"{p}_{j}.png"), p) for p in pids for j in range(3)]  # 3 images per patient
    for f in range(5):
        train_items, val_items = ds.split_fold(items, f, 5, seed=3)
        assert {p for _, p in train_items}.isdisjoint({p for _, p in val_items})
        assert len(train_items) + len(val_items) == len(items)
    with pytest.raises(ValueError):
        ds.split_fold(items, 5, 5)


def test_augmentation_moves_boxes_with_the_image():
    size = 128
    img = np.zeros((size, size), dtype=np.float32)
    img[30:60, 20:70] = 1.0
    box = np.array([[20, 30, 70, 60]], dtype=np.float32)
    cfg = ds.AugmentConfig(blur_p=0.0, noise_p=0.0, gamma=(1.0, 1.0), shear_deg=6.0, rotate_deg=0.0)
    flipped_seen = False
    for seed in range(8):
        out, ob = ds.augment(img, box, np.random.default_rng(seed), cfg)
        assert ob.shape == (1, 4)
        ys, xs = np.nonzero(out > 0.5)
        found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float32)
        assert box_iou(found, ob)[0, 0] > 0.85, (seed, found, ob)
        flipped_seen |= bool(ob[0, 0] > size / 2 - 20)
    assert flipped_seen  # horizontal flips happen
    # a flip alone mirrors exactly
    m = ds.affine_matrix(size, flip=True, scale=1.0, shift=(0, 0), shear_deg=0, rotate_deg=0)
    np.testing.assert_allclose(ds.warp_boxes(box, m, size), [[58, 30, 108, 60]], atol=1e-4)


def test_read_rsna_labels(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("patientId,x,y,width,height,Target\na,10,20,30,40,1\na,100,100,10,10,1\nb,,,,,0\n")
    lab = ds.read_rsna_labels(p)
    np.testing.assert_allclose(lab.boxes["a"], [[10, 20, 40, 60], [100, 100, 110, 110]])
    assert lab.boxes["b"].shape == (0, 4)
    assert lab.target == {"a": 1, "b": 0}
    assert lab.global_class == {"a": 2, "b": 0}
    d = tmp_path / "d.csv"
    d.write_text("patientId,class\nb,No Lung Opacity / Not Normal\n")
    assert ds.read_rsna_labels(p, d).global_class["b"] == 1


@pytest.mark.skipif(not NIH.is_dir(), reason="shared data not present")
def test_smoke_train_on_real_nih_pngs(tmp_path):
    cfg = TrainConfig(images=str(NIH / "images"), labels=str(NIH / "LABEL_ROWS_rsna_stage_2_train_labels.csv"),
                      mapping=str(NIH / "MAP_nih_image_to_rsna_patientId.csv"), out_dir=str(tmp_path / "nih"),
                      backbone="tiny", image_size=128, limit=6, batch_size=2, epochs=1, max_iterations=2, threads=1)
    r = train(cfg, progress=False, log=lambda s: None)
    assert r.iterations == 2 and r.checkpoint.is_file()
    labels = ds.read_rsna_labels(cfg.labels)
    classes = ds.read_detailed_classes_from_mapping(cfg.mapping)
    assert set(classes.values()) == {0, 1, 2} and len(labels.target) == 222


def test_cli_train_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from cxr_triage.models.cli_eval import register

    img_dir, labels = _write_png_dataset(tmp_path)
    app = typer.Typer()
    register(app)
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["train", "--images", str(img_dir), "--labels", str(labels), "--out", str(out),
                                 "--backbone", "tiny", "--image-size", "64", "--max-iterations", "1",
                                 "--batch-size", "2", "--threads", "1", "--box-loss", "giou"])
    assert r.exit_code == 0, r.output
    assert "1 iterations" in r.output and (out / "last.pt").is_file()
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["train_config"]["box_loss"] == "giou" and state["config"]["backbone"] == "tiny"


def test_cli_trained_checkpoint_with_non_default_config_imports(tmp_path):
    """`models train --image-size 96 --default-anchors` then `models import`: the card describes what was trained
    (it used to be refused with "conflicting arguments" against the 512 px / small-anchor defaults)."""
    from typer.testing import CliRunner

    from cxr_triage.cli import app
    from cxr_triage.models.registry import find_card

    img_dir, labels = _write_png_dataset(tmp_path)
    out = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(app, ["models", "train", "--images", str(img_dir), "--labels", str(labels), "--out", str(out),
                            "--backbone", "tiny", "--image-size", "96", "--default-anchors", "--max-iterations", "1",
                            "--batch-size", "2", "--threads", "1", "--no-augment"])
    assert r.exit_code == 0, r.output
    models_dir = tmp_path / "models"
    r = runner.invoke(app, ["models", "import", str(out / "last.pt"), "--name", "trained96", "--version", "1",
                            "--architecture", "retinanet-tiny", "--format", "detector",
                            "--models-dir", str(models_dir)])
    assert r.exit_code == 0, r.output
    card = find_card(models_dir, "trained96")
    assert card.input.size == 96
    assert card.architecture_params["image_size"] == 96 and card.architecture_params["small_anchors"] is False
    assert card.onnx is not None and card.onnx_path.is_file()
    # the wrong architecture is refused with the one to use, through the CLI too
    r = runner.invoke(app, ["models", "import", str(out / "last.pt"), "--name", "wrong", "--version", "1",
                            "--architecture", "retinanet-resnet50", "--format", "detector",
                            "--models-dir", str(models_dir)])
    assert r.exit_code == 1 and "--architecture retinanet-tiny" in r.output
