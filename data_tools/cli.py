"""`fact-data`: build identity-grouped FACT shards, inspect them, preview them, verify identities.

The only module of data_tools that prints.
"""

from __future__ import annotations

import json
import logging
import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build and check identity-grouped webdataset shards for FACT training.")
console = Console(stderr=True)
out_console = Console()


class Detector(str, Enum):
    mediapipe = "mediapipe"
    facexlib = "facexlib"


class Variant(str, Enum):
    S = "S"
    B = "B"
    L = "L"
    tiny = "tiny"


class IdentityModel(str, Enum):
    auto = "auto"
    dlib = "dlib"
    transface = "transface"


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} photos/s" if speed else "-- photos/s", style="cyan")


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def build(
    src: Path = typer.Option(..., "--src", help="Identity folders (src/<identity>/...) or a CSV/JSONL manifest."),
    out: Path = typer.Option(..., "--out", help="Output folder for shards, stats, manifest.json, rejects.jsonl."),
    detector: Detector = typer.Option(Detector.mediapipe, help="Face detector backend."),
    detector_weights: Optional[Path] = typer.Option(None, help="Folder with facexlib weights (detection_Resnet50_Final.pth, parsing_bisenet.pth)."),
    encoder: Variant = typer.Option(Variant.S, help="TransFace variant."),
    encoder_weights: Optional[Path] = typer.Option(None, help="Official TransFace file, e.g. ms1mv2_model_TransFace_S.pt."),
    random_encoder: bool = typer.Option(False, "--random-encoder", help="Seeded RANDOM encoder weights (tests and demos only)."),
    resolution: int = typer.Option(512, help="Side of the square training crop."),
    min_face_size: int = typer.Option(64, help="Reject faces whose box is smaller than this (source pixels)."),
    min_score: float = typer.Option(0.5, help="Reject faces with a lower detection score."),
    keep_dominant: bool = typer.Option(False, "--keep-dominant", help="With several faces keep the clearly largest one instead of rejecting."),
    dominant_ratio: float = typer.Option(2.0, help="Area ratio largest/second that counts as clearly largest."),
    max_face_outside: float = typer.Option(0.1, help="Reject faces with more than this fraction of their box outside the image."),
    mask_dilate: float = typer.Option(0.0, help="Dilate the face mask by this fraction of the face size."),
    face_fraction: float = typer.Option(0.35, help="Face size as a fraction of the training crop's side."),
    max_pixels: int = typer.Option(64_000_000, help="Reject images with more pixels (decompression bombs)."),
    jpeg_quality: int = typer.Option(95, help="JPEG quality of the training crops."),
    caption_template: str = typer.Option("a photo of a person", help="Caption without a sidecar .txt; {identity} is replaced."),
    max_per_group: int = typer.Option(16, help="At most this many images per identity sample."),
    images_per_shard: int = typer.Option(512, help="About this many input photos per shard (identities are never split)."),
    workers: int = typer.Option(1, help="Worker processes for decoding, detection, masks and crops."),
    batch_size: int = typer.Option(32, help="Encoder batch size."),
    device: str = typer.Option("auto", help="Encoder device: auto, cpu, cuda, cuda:1..."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Keep finished shards of an interrupted build."),
    verify_identities: bool = typer.Option(False, "--verify-identities", help="Flag images that do not match their identity."),
    drop_mismatched: bool = typer.Option(False, "--drop-mismatched", help="Reject flagged images (needs --verify-identities)."),
    identity_model: IdentityModel = typer.Option(IdentityModel.auto, help="auto: TransFace with real weights, else dlib."),
    identity_threshold: Optional[float] = typer.Option(None, help="Distance threshold (dlib default 0.6, TransFace cosine 0.6)."),
) -> None:
    """Build webdataset shards: one sample per identity group, with crops, masks, aligned faces, tokens."""
    from data_tools.build import BuildOptions, run_build
    from data_tools.records import RecordOptions

    try:
        record = RecordOptions(resolution=resolution, min_face_size=min_face_size, min_score=min_score,
                               keep_dominant=keep_dominant, dominant_ratio=dominant_ratio,
                               max_face_outside=max_face_outside, mask_dilate=mask_dilate,
                               face_fraction=face_fraction, max_pixels=max_pixels, jpeg_quality=jpeg_quality)
        opts = BuildOptions(src=src, out=out, record=record, detector=detector.value, detector_weights=detector_weights,
                            encoder=encoder.value, encoder_weights=encoder_weights, random_encoder=random_encoder,
                            caption_template=caption_template, max_per_group=max_per_group,
                            images_per_shard=images_per_shard, workers=workers, batch_size=batch_size, device=device,
                            resume=resume, verify_identities=verify_identities, drop_mismatched=drop_mismatched,
                            identity_model=identity_model.value, identity_threshold=identity_threshold)
    except ValueError as exc:
        _fail(str(exc))
    if not src.exists():
        _fail(f"--src not found: {src}")
    if random_encoder and encoder_weights is None:
        console.print("[bold yellow]warning:[/] --random-encoder: features come from RANDOM weights; "
                      "fine for tests and demos, useless for training")
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("photos", total=None)

        def on_plan(found: int, shards: int) -> None:
            progress.update(task, total=found, description=f"photos ({shards} shards)")

        try:
            manifest = run_build(opts, progress=lambda n: progress.advance(task, n), on_plan=on_plan)
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
            progress.stop()
            _fail(str(exc))
    _print_summary(manifest, out)


def _print_summary(manifest: dict, out: Path) -> None:
    c = manifest["counts"]
    table = Table(title=f"fact-data build -> {out}")
    table.add_column("identity")
    table.add_column("found", justify="right")
    table.add_column("accepted", justify="right")
    table.add_column("groups", justify="right")
    for name, row in manifest["identities"].items():
        style = "red" if row["accepted"] == 0 else None
        table.add_row(name, str(row["found"]), str(row["accepted"]), str(row["groups"]), style=style)
    table.add_section()
    table.add_row("total", str(c["found"]), str(c["accepted"]), str(c["samples"]), style="bold")
    out_console.print(table)
    if manifest["rejects_by_reason"]:
        reasons = Table(title="rejected (see rejects.jsonl)")
        reasons.add_column("reason")
        reasons.add_column("count", justify="right")
        for reason, n in manifest["rejects_by_reason"].items():
            reasons.add_row(reason, str(n))
        out_console.print(reasons)
    out_console.print(f"{len(manifest['shards'])} shards, {manifest['resumed_shards']} resumed; "
                      f"encoder TransFace-{manifest['encoder']['variant']} tokens {manifest['encoder']['token_shape']}")
    for warning in manifest["warnings"]:
        out_console.print(f"[bold yellow]warning:[/] {warning}")


@app.command()
def inspect(path: Path = typer.Argument(..., help="A folder written by `fact-data build`.")) -> None:
    """Counts, identities, encoder and format version; reads every shard to its end."""
    from data_tools.dataset import inspect_dataset

    if not path.is_dir():
        _fail(f"not a folder: {path}")
    report = inspect_dataset(path)
    m = report.manifest or {}
    if m:
        enc = m.get("encoder", {})
        out_console.print(f"format version {m.get('format_version')}; encoder TransFace-{enc.get('variant')} "
                          f"tokens {enc.get('token_shape')} {enc.get('token_dtype')}"
                          f"{' [bold yellow](RANDOM weights)[/]' if enc.get('random') else ''}; "
                          f"weights sha256 {enc.get('weights_sha256')}")
        c = m.get("counts", {})
        out_console.print(f"{c.get('identities')} identities, {c.get('samples')} samples, {c.get('images')} images; "
                          f"found {c.get('found')}, rejected {c.get('rejected')} {m.get('rejects_by_reason')}")
    table = Table(title=f"shards in {path}")
    for col in ("shard", "samples", "images", "status"):
        table.add_column(col)
    for s in report.shards:
        table.add_row(s.name, str(s.samples), str(s.images), "[green]ok[/]" if s.ok else f"[red]BAD: {s.error}[/]")
    out_console.print(table)
    for problem in report.problems:
        out_console.print(f"[red]problem:[/] {problem}")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def preview(
    path: Path = typer.Argument(..., help="A folder written by `fact-data build`."),
    out: Path = typer.Option(Path("sheet.png"), "--out", help="PNG file to write."),
    max_images: int = typer.Option(48, help="At most this many images."),
    columns: int = typer.Option(6, help="Tiles per row."),
) -> None:
    """Contact sheet PNG: crops with mask overlay, landmarks and face box, next to the aligned faces."""
    from data_tools.dataset import ShardError
    from data_tools.preview import contact_sheet

    try:
        sheet = contact_sheet(path, max_images=max_images, columns=columns)
    except (ShardError, ValueError) as exc:
        _fail(str(exc))
    sheet.save(out)
    out_console.print(f"wrote {out} ({sheet.width}x{sheet.height})")


@app.command("verify-identities")
def verify_identities(
    path: Path = typer.Argument(..., help="A folder written by `fact-data build`."),
    threshold: Optional[float] = typer.Option(None, help="dlib distance threshold (default 0.6)."),
    report: Optional[Path] = typer.Option(None, help="Write every image's check as JSONL here."),
) -> None:
    """Flag images whose face does not match the rest of their identity (dlib face-recognition model)."""
    from data_tools.dataset import ShardError, verify_dataset

    try:
        rows = verify_dataset(path, threshold=threshold)
    except (ShardError, ModuleNotFoundError) as exc:
        _fail(str(exc))
    if report:
        report.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    flagged = [r for r in rows if not r["ok"]]
    table = Table(title=f"{len(flagged)} of {len(rows)} images flagged ({rows[0]['model'] if rows else 'dlib'})")
    for col in ("identity", "source", "distance"):
        table.add_column(col)
    for r in flagged:
        table.add_row(r["identity"], r["source"], str(r["distance"]))
    out_console.print(table)


def main() -> None:
    # Quiet the native (glog / TFLite) logging of mediapipe in this process and in spawned workers.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app()


if __name__ == "__main__":
    main()
