"""``cxr-triage models ...``: import / fetch / export / build / list model weights and cards.

The lead mounts :data:`app` as the ``models`` sub-command. Extra commands (``evaluate``, ``train``) are added by
``cxr_triage.models.cli_eval.register(app)`` when that module exists.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional

import typer

from .registry import find_card, import_weights, fetch_weights, list_cards, models_dir_from_env, save_card

app = typer.Typer(help="Model weights, cards, ONNX export and TensorRT engines.", no_args_is_help=True)

_MODELS_DIR = typer.Option(None, "--models-dir", help="default: $CXR_DATA_DIR/models (CXR_DATA_DIR default ./var)")


def _dir(models_dir: Optional[Path]) -> Path:
    return Path(models_dir) if models_dir else models_dir_from_env()


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


@app.command("import")
def import_cmd(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="checkpoint file"),
    name: str = typer.Option(..., "--name"),
    version: str = typer.Option(..., "--version"),
    architecture: str = typer.Option("densenet121-xrv", "--architecture",
                                     help="densenet121-xrv | densenet121-chexnet | resnet50-xrv | resnet50 | retinanet-resnet50 ..."),
    format: str = typer.Option("xrv", "--format", help="xrv | chexnet | torchvision | detector"),  # noqa: A002
    threshold: Optional[float] = typer.Option(None, "--threshold", help="operating threshold of the positive label"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="accept pickled whole-model checkpoints (trusted files only)"),
    ensemble: Optional[str] = typer.Option(None, "--ensemble", help="detector ensemble group: cards sharing it run together, boxes merged by weighted box fusion"),
    ensemble_weight: float = typer.Option(1.0, "--ensemble-weight", min=0.0, help="this member's weight in the fusion"),
    models_dir: Optional[Path] = _MODELS_DIR,
) -> None:
    """Copy a checkpoint into the models dir, validate it, export ONNX and write its card."""
    from .classifier import CheckpointError
    from .registry import WeightsError, apply_card_options

    d = _dir(models_dir)
    try:
        card = import_weights(path, models_dir=d, name=name, version=version,
                              architecture=architecture, format=format, allow_pickle=allow_pickle)
        if threshold is not None or ensemble is not None:
            card = apply_card_options(card, d, threshold=threshold, ensemble=ensemble,
                                      ensemble_weight=ensemble_weight)
    except (CheckpointError, WeightsError, ValueError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"imported {card.ref} sha256={card.weights.sha256} onnx={card.onnx.file if card.onnx else '-'}")


@app.command("fetch")
def fetch_cmd(
    name: str = typer.Argument(..., help="a name in the model catalogue (<models dir>/sources.json, CXR_MODEL_SOURCES)"),
    url: Optional[str] = typer.Option(None, "--url", help="overrides the catalogue's URL"),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="overrides the catalogue's sha256"),
    version: Optional[str] = typer.Option(None, "--version"),
    architecture: Optional[str] = typer.Option(None, "--architecture"),
    format: Optional[str] = typer.Option(None, "--format"),  # noqa: A002
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
    models_dir: Optional[Path] = _MODELS_DIR,
) -> None:
    """Download weights named in the model catalogue (resumable, sha256-verified), then import them as
    `models import` does: validate, export ONNX, write the card."""
    from .classifier import CheckpointError
    from .registry import WeightsError, load_sources, model_sources_from_env

    d = _dir(models_dir)
    try:
        sources = load_sources(d, model_sources_from_env())
        card = fetch_weights(name, models_dir=d, url=url, sha256=sha256, version=version,
                             architecture=architecture, format=format, allow_pickle=allow_pickle, sources=sources)
    except (CheckpointError, WeightsError, ValueError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"fetched {card.ref} sha256={card.weights.sha256} onnx={card.onnx.file if card.onnx else '-'}")


@app.command("export")
def export_cmd(name: str = typer.Argument(...), opset: int = typer.Option(17, "--opset"),
               models_dir: Optional[Path] = _MODELS_DIR) -> None:
    """(Re-)export a model's ONNX file from its torch weights."""
    from .export import export_card_onnx

    try:
        card = export_card_onnx(find_card(_dir(models_dir), name), opset=opset, save=True)
    except (KeyError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"exported {card.ref} -> {card.onnx.file if card.onnx else '?'}")


@app.command("build")
def build_cmd(
    name: str = typer.Argument(...),
    precision: str = typer.Option("fp16", "--precision", help="fp32 | fp16 | int8"),
    calibration_dir: Optional[Path] = typer.Option(None, "--calibration-dir", help="images for INT8 calibration"),
    max_batch: int = typer.Option(8, "--max-batch", min=1),
    models_dir: Optional[Path] = _MODELS_DIR,
) -> None:
    """Build (or reuse) a TensorRT plan for a model (needs TensorRT and a CUDA GPU) and record its settings in the
    model card, so the worker loads this plan (and rebuilds it the same way after a TensorRT or GPU change)."""
    from dataclasses import replace

    from .export import (ExportError, build_tensorrt_engine, load_calibration_images, tensorrt_build_record,
                         tensorrt_environment)
    from .registry import verify_onnx

    d = _dir(models_dir)
    try:
        card = find_card(d, name)
        onnx_path = verify_onnx(card)
        calib = None
        if calibration_dir is not None and precision == "int8":
            calib = load_calibration_images(calibration_dir, card.input)
        # The record first: it validates the settings (int8 without images) before any TensorRT work.
        record = tensorrt_build_record(precision=precision, max_batch=max_batch, calibration_dir=calibration_dir,
                                       calibration_images=calib)
        env = tensorrt_environment()
        plan = build_tensorrt_engine(onnx_path, precision=record.precision, calibration_images=calib,
                                     max_batch=record.max_batch, cache_dir=d / "engines",
                                     onnx_sha256=card.onnx.sha256 if card.onnx else None, environment=env)
    except (KeyError, ValueError, RuntimeError, ExportError) as exc:
        _fail(str(exc))
        return
    cc = f"{env.compute_capability[0]}.{env.compute_capability[1]}"
    record = replace(record, plan=plan.relative_to(d).as_posix() if plan.is_relative_to(d) else str(plan),
                     tensorrt_version=env.tensorrt_version, gpu_name=env.gpu_name, compute_capability=cc)
    save_card(replace(card, tensorrt=record), d)
    typer.echo(f"engine {plan} ({record.precision}, max batch {record.max_batch}"
               + (f", {record.calibration_count} calibration images" if record.calibration_count else "")
               + f"); recorded in {name}.card.json")


@app.command("list")
def list_cmd(models_dir: Optional[Path] = _MODELS_DIR, as_json: bool = typer.Option(False, "--json")) -> None:
    """List model cards."""
    cards = list_cards(_dir(models_dir))
    if as_json:
        typer.echo(json.dumps([c.to_json() for c in cards], indent=2))
        return
    if not cards:
        typer.echo("no models (import one, or set CXR_DEMO_MODELS=1)")
    for c in cards:
        onnx = "onnx" if c.onnx else "no-onnx"
        typer.echo(f"{c.ref:40s} {c.task:15s} {c.architecture:22s} {onnx:8s} {'DEMO ' if c.demo else ''}{c.display_name}")


def _register_extensions() -> None:
    try:
        mod = importlib.import_module("cxr_triage.models.cli_eval")
    except ModuleNotFoundError as exc:
        if exc.name != "cxr_triage.models.cli_eval":
            raise
        return
    register = getattr(mod, "register", None)
    if register is not None:
        register(app)


_register_extensions()
