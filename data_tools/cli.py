"""`fact-data`: build identity-grouped FACT shards, add cached VAE latents, inspect, preview, verify identities.

The only module of data_tools that prints. `build`'s options are the fields of ``BuildOptions`` and
``RecordOptions`` (default, type, range and help declared there once) turned into Typer parameters here.
Errors a user can fix, a number out of range included, end as one ``error: ...`` line and exit status 2
(``fact_lightning.commands.cli_errors``: ``guarded`` and ``run_app``).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect as pyinspect
import io
import json
import logging
import typing
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from data_tools.options import AddLatentsOptions, BuildOptions
from fact_lightning.checks import count, number
from fact_lightning.commands.cli_errors import guarded, run_app
from fact_lightning.commands.console import progress as progress_display
from fact_lightning.errors import UserError

# Plain click help: it wraps long option names and help at any width instead of cutting them off.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Build and check identity-grouped webdataset shards for FACT training.")
console = Console(stderr=True)
out_console = Console()


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} photos/s" if speed else "-- photos/s", style="cyan")


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    handler = RichHandler(console=console, show_path=False)
    # The random-encoder warning is the build summary's to give, once (the loader logs it too).
    handler.addFilter(lambda record: "RANDOMLY INITIALISED" not in record.getMessage())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s", handlers=[handler])


# --- options declared on dataclasses -> Typer parameters -----------------------------------------------
def _option_parameters(cls: type) -> list[pyinspect.Parameter]:
    """One keyword parameter per field of ``cls`` (nested dataclasses flattened), with its default and help."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            params += _option_parameters(hint)
            continue
        if not f.metadata.get("cli", True):
            continue
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        name = "--" + f.name.replace("_", "-")
        default = ... if f.default is dataclasses.MISSING else f.default
        if base is bool:
            decls = [f"{name}/--no-{name[2:]}" if default else name]
        else:
            decls = [f.metadata.get("flag") or name]
        choices = f.metadata.get("choices")
        if choices:  # Typer spells a choice as an Enum
            base = enum.Enum(f.name, [(c, c) for c in choices], type=str)
            default = base(default) if default is not ... else default
        number = {}
        if base in (int, float):  # every number parses through its declared range
            if f.metadata.get("range") is None:
                raise TypeError(f"numeric option {f.name!r} of {cls.__name__} has no range: option(range=...)")
            number = dict(parser=f.metadata["range"], metavar="INTEGER" if base is int else "FLOAT")
        option = typer.Option(default, *decls, help=f.metadata.get("help", ""), **number)
        annotation = Optional[base] if optional else base
        params.append(pyinspect.Parameter(f.name, pyinspect.Parameter.KEYWORD_ONLY, default=option,
                                          annotation=annotation))
    return params


def _from_options(cls: type, values: dict) -> Any:
    """``cls`` built from the flat parameter values (nested dataclasses from their own fields)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _from_options(hints[f.name], values)
        elif f.name in values:
            value = values[f.name]
            kwargs[f.name] = value.value if isinstance(value, enum.Enum) else value
    return cls(**kwargs)


def _with_parameters(params: list[pyinspect.Parameter]):
    def decorate(fn):
        fn.__signature__ = pyinspect.Signature(params)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn
    return decorate


# --- build -----------------------------------------------------------------------------------------------
@app.command()
@_with_parameters(_option_parameters(BuildOptions))
@guarded
def build(**values: Any) -> None:
    """Build webdataset shards: one sample per identity group, with crops, masks, aligned faces, tokens."""
    from data_tools.build import run_build

    opts = _from_options(BuildOptions, values)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with progress_display(*columns, console=console) as progress:  # plain lines when stderr is no terminal
        task = progress.add_task("photos", total=None, unit="photo")

        def on_plan(found: int, shards: int) -> None:
            progress.update(task, total=found, description=f"photos ({shards} shards)")

        manifest = run_build(opts, progress=lambda n: progress.advance(task, n), on_plan=on_plan)
    _print_summary(manifest, opts.out)
    if manifest.get("split"):
        from fact_lightning.data.shards import read_manifest

        held = read_manifest(opts.held_out_folder)
        _print_summary(held, opts.held_out_folder)
        c = held["counts"]
        out_console.print(f"held out {len(manifest['split']['held_out'])} identities "
                          f"({', '.join(manifest['split']['held_out'])}): {c['samples']} samples, {c['images']} images "
                          f"in {opts.held_out_folder} (train with data.val_root: {opts.held_out_folder})")


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
    out_console.print(f"{c['found']} files found = {c['accepted']} accepted + {c['rejected']} rejected")
    if manifest["rejects_by_reason"]:
        reasons = Table(title="rejected (see rejects.jsonl)")
        reasons.add_column("reason")
        reasons.add_column("count", justify="right")
        for reason, n in manifest["rejects_by_reason"].items():
            reasons.add_row(reason, str(n))
        out_console.print(reasons)
    out_console.print(f"{len(manifest['shards'])} shards, {manifest['resumed_shards']} resumed; "
                      f"encoder TransFace-{manifest['encoder']['variant']} tokens {manifest['encoder']['token_shape']}")
    out_console.print(_latents_line(manifest))
    for warning in manifest["warnings"]:
        out_console.print(f"[bold yellow]warning:[/] {warning}")


def _latents_line(manifest: dict) -> str:
    vae = manifest.get("vae")
    if not vae:
        return "latents: none cached (training encodes the crops with the model's VAE)"
    made = f"seed {vae.get('seed')}" if vae.get("seed") is not None else (
        f"{vae.get('source')}" + (f" revision {vae['revision']}" if vae.get("revision") else ""))
    return (f"latents: VAE {vae.get('name')} ({made}; weights sha256 {vae.get('weights_sha256')}); mean and std "
            f"{vae.get('latent_shape')} {vae.get('latent_dtype')}, scaling factor {vae.get('scaling_factor')} not applied")


# --- add-latents -----------------------------------------------------------------------------------------
@app.command("add-latents")
@_with_parameters([pyinspect.Parameter("path", pyinspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Argument(
    ..., help="A folder written by `fact-data build`."))] + _option_parameters(AddLatentsOptions))
@guarded
def add_latents(path: Path, **values: Any) -> None:
    """Cache every crop's VAE latent mean and std in existing shards (resumable; manifest.json last)."""
    from data_tools.latents import run_add_latents

    _dataset_folder(path)
    opts = _from_options(AddLatentsOptions, values)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with progress_display(*columns, console=console) as progress:
        task = progress.add_task("images", total=_image_count(path), unit="image")
        manifest = run_add_latents(path, opts, progress=lambda n: progress.advance(task, n))
    out_console.print(f"{len(manifest['shards'])} shards, {manifest['resumed_shards']} already had these latents")
    out_console.print(_latents_line(manifest))


def _image_count(path: Path) -> int | None:
    """The images of a finished build (the progress total), or None where its manifest cannot tell."""
    from fact_lightning.data.shards import ManifestError, read_manifest

    try:
        manifest = read_manifest(path)
    except (ManifestError, OSError):  # run_add_latents reports it, in one line
        return None
    images = [entry.get("images") for entry in manifest["shards"] if isinstance(entry, dict)]
    return sum(images) if images and all(isinstance(n, int) for n in images) else None


# --- reading ---------------------------------------------------------------------------------------------
def _dataset_folder(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"not a folder: {path}")


@app.command()
@guarded
def inspect(
    path: Path = typer.Argument(..., help="A folder written by `fact-data build`."),
    quick: bool = typer.Option(False, "--quick", help="Check structure, tokens and sha256 without decoding images."),
) -> None:
    """Counts, encoder and format version; checks every shard's sha256 and every sample against the manifest."""
    from data_tools.dataset import inspect_dataset

    _dataset_folder(path)
    report = inspect_dataset(path, quick=quick)
    m = report.manifest or {}
    if m:
        enc = m.get("encoder", {})
        out_console.print(f"format version {m.get('format_version')}; encoder TransFace-{enc.get('variant')} "
                          f"tokens {enc.get('token_shape')} {enc.get('token_dtype')}"
                          f"{' [bold yellow](RANDOM weights)[/]' if enc.get('random') else ''}; "
                          f"weights sha256 {enc.get('weights_sha256')}")
        out_console.print(_latents_line(m))
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
@guarded
def preview(
    path: Path = typer.Argument(..., help="A folder written by `fact-data build`."),
    out: Path = typer.Option(Path("sheet.png"), "--out", help="PNG file to write."),
    max_images: int = typer.Option(48, help="At most this many images.", parser=count(1, 10_000), metavar="INTEGER"),
    columns: int = typer.Option(6, help="Tiles per row.", parser=count(1, 100), metavar="INTEGER"),
) -> None:
    """Contact sheet PNG: crops with mask overlay, landmarks and face box, next to the aligned faces."""
    from data_tools.preview import contact_sheet
    from fact_lightning.files import write_bytes_atomic

    _dataset_folder(path)
    sheet = contact_sheet(path, max_images=max_images, columns=columns)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_bytes_atomic(out, buf.getvalue())
    out_console.print(f"wrote {out} ({sheet.width}x{sheet.height})")


@app.command("verify-identities")
@guarded
def verify_identities(
    path: Path = typer.Argument(..., help="A folder written by `fact-data build`."),
    threshold: Optional[float] = typer.Option(None, help="dlib distance threshold (default 0.6).",
                                              parser=number(above=0.0, max=100.0), metavar="FLOAT"),
    report: Optional[Path] = typer.Option(None, help="Write every image's check as JSONL here."),
) -> None:
    """Flag images whose face does not match the rest of their identity (dlib face-recognition model)."""
    from data_tools.dataset import verify_dataset
    from fact_lightning.files import write_bytes_atomic

    _dataset_folder(path)
    try:
        rows = verify_dataset(path, threshold=threshold)
    except ModuleNotFoundError as exc:
        raise UserError(f"{exc}: install the dlib extra (pip install 'fact-lightning[dlib]')") from None
    if report:
        write_bytes_atomic(report, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8"))
    flagged = [r for r in rows if not r["ok"]]
    table = Table(title=f"{len(flagged)} of {len(rows)} images flagged ({rows[0]['model'] if rows else 'dlib'})")
    for col in ("identity", "source", "distance"):
        table.add_column(col)
    for r in flagged:
        table.add_row(r["identity"], r["source"], str(r["distance"]))
    out_console.print(table)


def main() -> None:
    raise SystemExit(run_app(app))


if __name__ == "__main__":
    main()
