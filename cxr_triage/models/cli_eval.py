"""``cxr-triage models evaluate`` and ``cxr-triage models train`` (added to the models typer app by
:func:`register`, which ``cxr_triage.models.cli_models`` calls)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def evaluate_cmd(
    labels: Path = typer.Option(..., "--labels", exists=True, dir_okay=False,
                                help="RSNA label CSV: patientId,x,y,width,height,Target"),
    images: Optional[Path] = typer.Option(None, "--images", exists=True, file_okay=False,
                                          help="folder of DICOM/PNG/JPEG images (needed to run models)"),
    mapping: Optional[Path] = typer.Option(None, "--mapping", exists=True, dir_okay=False,
                                           help="CSV: image file name -> rsna_patientId (else file stem = patientId)"),
    out: Path = typer.Option(Path("evaluation"), "--out", help="report folder"),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="run the models of this folder"),
    demo: bool = typer.Option(False, "--demo", help="run the UNTRAINED demo models (built on first use)"),
    engine: str = typer.Option("auto", "--engine", help="auto | onnxruntime | tensorrt | torch"),
    reference: list[Path] = typer.Option([], "--reference-predictions", exists=True, dir_okay=False,
                                         help="predictions CSV to evaluate without running models (repeatable)"),
    reference_column: str = typer.Option("prob_Pneumonia", "--reference-column"),
    threshold: Optional[float] = typer.Option(None, "--threshold",
                                              help="operating point; default: Youden-optimal on this set"),
    limit: Optional[int] = typer.Option(None, "--limit", help="evaluate only the first N images"),
    batch_size: int = typer.Option(4, "--batch-size"),
    sweeps: bool = typer.Option(True, "--sweeps/--no-sweeps", help="score/NMS threshold sweeps (detector)"),
    formats: str = typer.Option("md,html", "--formats", help="comma list of md, html"),
    threads: Optional[int] = typer.Option(None, "--threads", help="intra-op threads for the engines"),
    title: str = typer.Option("cxr-triage evaluation", "--title"),
) -> None:
    """Evaluate models and/or predictions CSVs against RSNA labels; write a Markdown/HTML report with plots."""
    from cxr_triage.models import evaluate as ev

    fmts = tuple(f.strip() for f in formats.split(",") if f.strip())
    if not set(fmts) <= {"md", "html"} or not fmts:
        raise typer.BadParameter("--formats: md and/or html")
    run_models = demo or models_dir is not None
    if not run_models and not reference:
        raise typer.BadParameter("nothing to evaluate: give --models-dir/--demo and/or --reference-predictions")
    if run_models and images is None:
        raise typer.BadParameter("--images is required to run models")
    eval_set = ev.load_eval_set(labels, images_dir=images, mapping_csv=mapping, limit=limit)
    results: list[ev.ScorerResult] = []
    for ref in reference:  # on the same images as the models when --images is given
        results.append(ev.evaluate_predictions_csv(ref, eval_set, score_column=reference_column,
                                                   threshold=threshold, name=f"reference: {ref.stem}"))
    if run_models:
        from cxr_triage.models.analyzer import ModelsUnavailable, build_analyzer
        from cxr_triage.models.registry import models_dir_from_env

        try:
            analyzer = build_analyzer(models_dir=models_dir or models_dir_from_env(), demo=demo, engine=engine,
                                      intra_op_threads=threads)
        except ModelsUnavailable as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        results += ev.evaluate_analyzer(analyzer, eval_set, name="demo models" if analyzer.demo else "models",
                                        batch_size=batch_size, sweeps=sweeps, threshold=threshold)
    n_pos = sum(eval_set.target.values())
    note = (f"{len(eval_set.target)} labelled images ({n_pos} with Target=1, "
            f"{sum(len(v) for v in eval_set.ground_truth.values())} boxes) from {labels.name}"
            + (f", images in {images}" if images else "") + ". Operating point: "
            + (f"threshold {threshold}" if threshold is not None else "Youden-optimal on this set (optimistic)") + ".")
    files = ev.write_report(results, out, title=title, dataset_note=note, formats=fmts)
    for r in results:
        c = r.classification
        rsna = f" RSNA={r.rsna.score:.4f} ({r.rsna.n_counted} counted)" if r.rsna else ""
        typer.echo(f"{r.name}: n={c.n_positive + c.n_negative} AUC={c.auc:.4f} sens={c.sensitivity:.3f} "
                   f"spec={c.specificity:.3f} @ {c.threshold:.3f}{rsna}")
    typer.echo(f"report: {', '.join(str(f) for f in files)}")


def train_cmd(
    images: Path = typer.Option(..., "--images", exists=True, file_okay=False),
    labels: Path = typer.Option(..., "--labels", exists=True, dir_okay=False),
    out: Path = typer.Option(..., "--out", help="checkpoint folder"),
    detailed_class_info: Optional[Path] = typer.Option(None, "--detailed-class-info", exists=True, dir_okay=False),
    mapping: Optional[Path] = typer.Option(None, "--mapping", exists=True, dir_okay=False),
    backbone: str = typer.Option("resnet50", "--backbone", help="resnet50 | resnext101 | resnet18 | tiny"),
    image_size: int = typer.Option(512, "--image-size"),
    small_anchors: bool = typer.Option(True, "--small-anchors/--default-anchors"),
    folds: int = typer.Option(5, "--folds"),
    fold: int = typer.Option(0, "--fold"),
    epochs: int = typer.Option(16, "--epochs"),
    batch_size: int = typer.Option(4, "--batch-size"),
    lr: float = typer.Option(1e-5, "--lr"),
    max_iterations: Optional[int] = typer.Option(None, "--max-iterations", help="stop after N steps (smoke runs)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="use only the first N matched images"),
    device: str = typer.Option("auto", "--device"),
    box_loss: str = typer.Option("smooth_l1", "--box-loss", help="smooth_l1 | giou | l1"),
    augment: bool = typer.Option(True, "--augment/--no-augment"),
    resume: Optional[Path] = typer.Option(None, "--resume", exists=True, dir_okay=False),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    workers: int = typer.Option(0, "--workers"),
) -> None:
    """Train the opacity detector (RetinaNet + global head) on RSNA-format data; checkpoint every epoch."""
    from cxr_triage.models.train import TrainConfig, train

    cfg = TrainConfig(
        images=str(images), labels=str(labels), out_dir=str(out),
        detailed_class_info=str(detailed_class_info) if detailed_class_info else None,
        mapping=str(mapping) if mapping else None, backbone=backbone, image_size=image_size,
        small_anchors=small_anchors, n_folds=folds, fold=fold, seed=seed, epochs=epochs, batch_size=batch_size,
        lr=lr, max_iterations=max_iterations, limit=limit, device=device, num_workers=workers, box_loss=box_loss,
        augment=augment, resume=str(resume) if resume else None, threads=threads,
    )
    try:
        result = train(cfg, log=typer.echo)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"checkpoint: {result.checkpoint} (epoch {result.epochs_done}, {result.iterations} iterations)")
    typer.echo(f"import with: cxr-triage models import {result.checkpoint} --name NAME --version VERSION "
               f"--architecture retinanet-{backbone} --format detector")


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` and ``train`` to the ``models`` typer app."""
    app.command("evaluate")(evaluate_cmd)
    app.command("train")(train_cmd)
