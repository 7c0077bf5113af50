"""Train the opacity detector on RSNA-format data (the 2nd-place RSNA Pneumonia recipe, scaled to config).

* patient-level K-fold split (:func:`cxr_triage.models.datasets.split_fold`, deterministic);
* augmentation: random shift / scale / shear (rotation off by default), horizontal flip, blur, noise, gamma,
  applied to the image and its boxes together (:func:`cxr_triage.models.datasets.augment`);
* multi-task loss: RetinaNet sigmoid focal loss + box regression (torchvision's RetinaNet head losses, box loss
  ``smooth_l1`` by default, ``giou``/``l1`` selectable) + ``global_loss_weight`` x cross-entropy of the
  3-class global head;
* Adam (lr 1e-5 by default), ReduceLROnPlateau(patience=4, factor=0.2) on the validation loss;
* a checkpoint after every epoch (``epoch_NNN.pt`` and ``last.pt``, written atomically) holding model,
  optimizer, scheduler, epoch, iteration, fold, the build config and the training config; ``resume`` restores
  all of it. The file loads with :func:`cxr_triage.models.detector.load_detector_checkpoint`, i.e. it is what
  ``cxr-triage models import --format detector`` takes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from cxr_triage.models import datasets as ds
from cxr_triage.models.detector import CHECKPOINT_FORMAT, GLOBAL_CLASSES, OpacityDetector, build_detector
from cxr_triage.models.postprocess import DetectionParams, decode_detections


@dataclass
class TrainConfig:
    images: str
    labels: str
    out_dir: str
    detailed_class_info: str | None = None
    mapping: str | None = None
    backbone: str = "resnet50"
    image_size: int = 512
    small_anchors: bool = True
    n_folds: int = 5
    fold: int = 0
    seed: int = 0
    epochs: int = 16
    batch_size: int = 4
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_iterations: int | None = None  # stop after this many optimizer steps in total (smoke runs)
    limit: int | None = None  # use only the first N matched images
    device: str = "auto"
    num_workers: int = 0
    global_loss_weight: float = 1.0
    box_loss: str = "smooth_l1"
    augment: bool = True
    resume: str | None = None
    threads: int | None = None

    def build_kwargs(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "image_size": self.image_size, "in_channels": 3,
                "num_global_classes": len(GLOBAL_CLASSES), "small_anchors": self.small_anchors}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class DetectionLoss(nn.Module):
    """Focal + box loss on anchors (torchvision RetinaNet head losses) + weighted CE on the global head."""

    def __init__(self, model: OpacityDetector, *, global_loss_weight: float = 1.0, box_loss: str = "smooth_l1"):
        super().__init__()
        from torchvision.models.detection._utils import Matcher

        if box_loss not in ("l1", "smooth_l1", "giou", "diou", "ciou"):
            raise ValueError(f"box_loss: unknown {box_loss!r}")
        self.model = model
        model.head.regression_head._loss_type = box_loss
        self.matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self.global_loss_weight = global_loss_weight
        self.register_buffer("anchors", torch.from_numpy(model.anchors()), persistent=False)

    def match(self, boxes: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, A) matched GT index per anchor (-1 background, -2 ignored) and (N, Mmax, 4) padded GT boxes."""
        from torchvision.ops import box_iou

        anchors = self.anchors.to(device)
        n_max = max([1] + [int(b.reshape(-1, 4).shape[0]) for b in boxes])
        padded = torch.zeros(len(boxes), n_max, 4, device=device)
        matched = []
        for i, b in enumerate(boxes):
            b = b.to(device, torch.float32).reshape(-1, 4)
            if b.numel() == 0:
                matched.append(torch.full((len(anchors),), -1, dtype=torch.int64, device=device))
            else:
                padded[i, : len(b)] = b
                matched.append(self.matcher(box_iou(b, anchors)))
        return torch.stack(matched), padded

    def forward(
        self,
        outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        boxes: Sequence[torch.Tensor],
        classes: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Batched equivalent of torchvision ``RetinaNet.compute_loss`` (per image: focal loss summed over
        non-ignored anchors / max(1, #foreground), box loss summed over foreground / max(1, #foreground);
        both averaged over the batch), plus the global cross-entropy."""
        from torchvision.models.detection._utils import _box_loss
        from torchvision.ops import sigmoid_focal_loss

        cls_logits, bbox_regression, global_logits = outputs
        device = cls_logits.device
        matched, padded = self.match(boxes, device)
        n = cls_logits.shape[0]
        fg = matched >= 0
        num_fg = fg.sum(dim=1).clamp(min=1).to(cls_logits.dtype)  # (N,)
        valid = (matched != -2).to(cls_logits.dtype)
        focal = sigmoid_focal_loss(cls_logits[..., 0], fg.to(cls_logits.dtype), reduction="none") * valid
        cls_loss = (focal.sum(dim=1) / num_fg).sum() / n
        img_idx, anc_idx = torch.nonzero(fg, as_tuple=True)
        if len(img_idx):
            gt = padded[img_idx, matched[img_idx, anc_idx]]
            anchors = self.anchors.to(device)[anc_idx]
            per = torch.zeros(n, device=device, dtype=cls_logits.dtype)
            head = self.model.head.regression_head
            # _box_loss sums; compute per foreground anchor by summing within each image
            for i in torch.unique(img_idx).tolist():
                sel = img_idx == i
                per[i] = _box_loss(head._loss_type, head.box_coder, anchors[sel], gt[sel],
                                   bbox_regression[i, anc_idx[sel]])
            box_loss = (per / num_fg).sum() / n
        else:
            box_loss = bbox_regression.sum() * 0.0
        g = nn.functional.cross_entropy(global_logits, classes.to(device))
        total = cls_loss + box_loss + self.global_loss_weight * g
        return {"loss": total, "classification": cls_loss, "bbox_regression": box_loss, "global": g}

    def torchvision_reference(
        self, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], boxes: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """torchvision's own RetinaNetHead.compute_loss on the same matching (for tests)."""
        matched, _ = self.match(boxes, outputs[0].device)
        targets = [{"boxes": b.reshape(-1, 4).float(), "labels": torch.zeros(len(b.reshape(-1, 4)), dtype=torch.int64)}
                   for b in boxes]
        anchors = self.anchors.to(outputs[0].device)
        return self.model.head.compute_loss(
            targets, {"cls_logits": outputs[0], "bbox_regression": outputs[1]}, [anchors] * len(boxes), list(matched)
        )


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=4, factor=0.2)


def train_step(
    model: OpacityDetector,
    loss_fn: DetectionLoss,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    classes: torch.Tensor,
    device: torch.device,
) -> dict[str, float]:
    model.train()
    out = model(images.to(device, non_blocking=True))
    losses = loss_fn(out, boxes, classes)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def save_checkpoint(
    path: str | Path,
    *,
    model: OpacityDetector,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    epoch: int = 0,
    iteration: int = 0,
    fold: int | None = None,
    train_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "config": dataclasses.asdict(model.config),
        "global_classes": list(GLOBAL_CLASSES),
        "input": {"size": model.config.image_size, "channels": 3, "normalisation": "imagenet", "resize": "letterbox"},
        "postprocess": dataclasses.asdict(DetectionParams()),
        "epoch": epoch,
        "iteration": iteration,
        "fold": fold,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "train_config": train_config,
        "metrics": metrics or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_training_state(
    path: str | Path, model: OpacityDetector, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
) -> dict[str, Any]:
    """Restore model (+ optimizer, scheduler) from a training checkpoint; returns the checkpoint dict.

    ``--resume`` takes a path from the user, so the file is read with ``weights_only=True``: tensors, plain
    containers and numbers only (everything :func:`save_checkpoint` writes). A file that needs arbitrary
    unpickling is refused with :class:`ValueError` instead of running its code."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path.name}: resume checkpoint does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch raises this for any global outside its allowlist (a class, a function, os.system ...)
        raise ValueError(
            f"{path.name}: refusing to resume from it: it contains pickled Python objects, not only tensors and "
            "plain data; only checkpoints written by `cxr-triage models train` can be resumed"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises several types for truncated/corrupt archives
        raise ValueError(f"{path.name}: not a loadable training checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    if state["config"] != dataclasses.asdict(model.config):
        raise ValueError(f"{path}: checkpoint config {state['config']} != model config")
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


@torch.no_grad()
def validate(
    model: OpacityDetector, loss_fn: DetectionLoss, loader: Any, device: torch.device, params: DetectionParams
) -> dict[str, float]:
    """Mean validation loss and the RSNA metric (model frame) on the validation loader."""
    from cxr_triage.models.evaluate import rsna_metric

    model.eval()
    anchors = model.anchors()
    total, n = 0.0, 0
    preds: dict[str, np.ndarray] = {}
    gts: dict[str, np.ndarray] = {}
    for images, boxes, classes in loader:
        out = model(images.to(device))
        total += float(loss_fn(out, boxes, classes)["loss"]) * len(images)
        cls, reg = out[0].float().cpu().numpy(), out[1].float().cpu().numpy()
        for i in range(len(images)):
            key = str(len(preds))
            preds[key] = decode_detections(cls[i], reg[i], anchors, params)
            gts[key] = boxes[i].numpy()
        n += len(images)
    return {"val_loss": total / max(1, n), "val_rsna": rsna_metric(preds, gts) if gts else float("nan")}


@dataclass
class TrainResult:
    checkpoint: Path
    epochs_done: int
    iterations: int
    history: list[dict[str, Any]] = field(default_factory=list)


def train(config: TrainConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """Run training per ``config``; returns the path of the last checkpoint."""
    from torch.utils.data import DataLoader

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    labels = ds.read_rsna_labels(config.labels, config.detailed_class_info)
    mapping = ds.read_mapping(config.mapping) if config.mapping else None
    if config.detailed_class_info is None and config.mapping:
        labels.global_class.update(ds.read_detailed_classes_from_mapping(config.mapping))
    items = ds.match_images(config.images, labels.target.keys(), mapping=mapping)
    if config.limit:
        items = items[: config.limit]
    if len(items) < 2:
        raise ValueError(f"{config.images}: only {len(items)} image(s) match the labels; need >= 2")
    train_items, val_items = ds.split_fold(items, config.fold, config.n_folds, seed=config.seed)
    if not train_items:
        train_items, val_items = items, []
    aug = ds.AugmentConfig() if config.augment else None
    train_ds = ds.DetectionDataset(train_items, labels, image_size=config.image_size, augment=aug, seed=config.seed)
    val_ds = ds.DetectionDataset(val_items, labels, image_size=config.image_size, augment=None)
    gen = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(train_ds, batch_size=config.batch_size, shuffle=True, generator=gen,
                              collate_fn=ds.collate, num_workers=config.num_workers, drop_last=False)
    val_loader = DataLoader(val_ds, batch_size=config.batch_size, shuffle=False, collate_fn=ds.collate,
                            num_workers=config.num_workers)

    model = build_detector(**config.build_kwargs()).to(device)
    loss_fn = DetectionLoss(model, global_loss_weight=config.global_loss_weight, box_loss=config.box_loss)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer)
    start_epoch, iteration = 0, 0
    if config.resume:
        state = load_training_state(config.resume, model, optimizer, scheduler)
        start_epoch, iteration = int(state["epoch"]), int(state["iteration"])
        log(f"resumed from {config.resume}: epoch {start_epoch}, iteration {iteration}")
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    log(f"device {device}; {len(train_items)} train / {len(val_items)} validation images (fold {config.fold})")

    history: list[dict[str, Any]] = []
    last = out_dir / "last.pt"
    epoch = start_epoch
    params = DetectionParams()
    for epoch in range(start_epoch + 1, config.epochs + 1):
        train_ds.set_epoch(epoch)
        sums: dict[str, float] = {}
        steps = 0
        t0 = time.perf_counter()
        bar = _progress(train_loader, progress, f"epoch {epoch}/{config.epochs}")
        stop = False
        for images, boxes, classes in bar:
            losses = train_step(model, loss_fn, optimizer, images, boxes, classes, device)
            iteration += 1
            steps += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses['loss']:.3f}")
            if config.max_iterations is not None and iteration >= config.max_iterations:
                stop = True
                break
        record: dict[str, Any] = {"epoch": epoch, "iteration": iteration, "seconds": time.perf_counter() - t0}
        record.update({f"train_{k}": v / max(1, steps) for k, v in sums.items()})
        if len(val_ds):
            record.update(validate(model, loss_fn, val_loader, device, params))
            scheduler.step(record["val_loss"])
        record["lr"] = optimizer.param_groups[0]["lr"]
        history.append(record)
        log(json.dumps({k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}))
        kw = dict(model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, iteration=iteration,
                  fold=config.fold, train_config=dataclasses.asdict(config), metrics=record)
        save_checkpoint(out_dir / f"epoch_{epoch:03d}.pt", **kw)
        save_checkpoint(last, **kw)
        if stop:
            break
    if not history and not last.exists():
        save_checkpoint(last, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                        iteration=iteration, fold=config.fold, train_config=dataclasses.asdict(config))
    return TrainResult(checkpoint=last, epochs_done=epoch, iterations=iteration, history=history)


def _progress(it: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False)
