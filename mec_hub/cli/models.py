"""``mec-hub list | info | download | convert | push``: the model registry and publishing."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mec_hub.cli.common import friendly_errors, option
from mec_hub.models.head_names import DEFAULT_HEAD, HEADS

HEADLINE_METRICS = (
    ("linear_paper_top1", "linear (authors' protocol)"),
    ("linear_top1", "linear probe"),
    ("knn_top1", "kNN"),
)


@click.command("list", short_help="List the published models.")
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@friendly_errors
def list_cmd(pattern: str | None, as_json: bool) -> None:
    """List the published models (optionally those matching a shell PATTERN like '*resnet*')."""
    from mec_hub.weights.registry import list_models, model_info

    names = list_models(pattern)
    if as_json:
        click.echo(json.dumps([model_info(n).to_dict() for n in names], indent=2))
        return
    for name in names:
        rec = model_info(name)
        meta = rec.config.meta
        # The headline figure, with its protocol: the authors' linear protocol, else the probe, else kNN.
        shown = [(key, label) for key, label in HEADLINE_METRICS if isinstance(meta.get(key), int | float)]
        metric = f"{shown[0][1]} top-1 {meta[shown[0][0]]}%" if shown else ""
        verified = "sha256 known" if rec.sha256 else "UNVERIFIED"
        where = "bundled" if rec.bundled else ("hub" if rec.hf_repo_id or rec.url else "no location")
        arch, dim = rec.config.architecture, rec.config.num_features
        click.echo(f"{name:<28} {arch:<12} D={dim:<5} {where:<8} {verified:<12} {metric}")


@click.command("info", short_help="Show a model's record, locations and digests as JSON.")
@click.argument("name")
@friendly_errors
def info_cmd(name: str) -> None:
    """Show everything known about model NAME (record, locations, digests) as JSON."""
    from mec_hub.weights.registry import model_info

    click.echo(json.dumps(model_info(name).to_dict(), indent=2))


@click.command("download", short_help="Download and verify a model, for offline use.")
@click.argument("name")
@click.option("--weights", "weights", help="Fetch from here instead of the published location.")
@click.option("--head", type=click.Choice(HEADS), default=DEFAULT_HEAD, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Hugging Face cache folder.")
@friendly_errors
def download_cmd(name: str, weights: str | None, head: str, cache_dir: str | None) -> None:
    """Download and verify model NAME into the cache, so that later runs work offline."""
    from mec_hub.weights.registry import model_info
    from mec_hub.weights.sources import fetch_weights, parse_weights_spec, record_location

    record = model_info(name)
    spec = parse_weights_spec(weights) if weights else None
    if spec is None or spec.kind == "default":
        spec = record_location(record)
    local = fetch_weights(spec, record=record, want_projector=head == "projector", cache_dir=cache_dir)
    click.echo(f"{name}: {local.model_file}")
    click.echo(f"sha256 {local.sha256}")


@click.command("convert", short_help="Convert a checkpoint to safetensors, detectron2 or torchvision.")
@click.argument("checkpoint", type=click.Path())
@option(
    "out",
    "out_dir",
    required=True,
    type=click.Path(),
    help="Folder to write (--to folder), or the file (.pkl for detectron2, .pth for torchvision).",
)
@click.option(
    "--to",
    "to",
    type=click.Choice(["folder", "detectron2", "torchvision"]),
    default="folder",
    show_default=True,
    help="folder: safetensors + config.json + model card; detectron2: the .pkl for MODEL.WEIGHTS; "
    "torchvision: a state dict for torchvision.models.resnet*() and MMDetection.",
)
@click.option("--arch", default=None, help="timm architecture (default: from the checkpoint, else resnet50).")
@click.option(
    "--from",
    "source",
    type=click.Choice(["student", "teacher"]),
    default="student",
    show_default=True,
    help="Which network of an MEC checkpoint to export.",
)
@click.option("--name", default=None, help="Model name recorded in config.json and the model card.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@friendly_errors
def convert_cmd(
    checkpoint: str, out_dir: str, to: str, arch: str | None, source: str, name: str | None, overwrite: bool
) -> None:
    """Convert an MEC CHECKPOINT (official .pth.tar, training checkpoint or state dict) to safetensors.

    With --to detectron2 or torchvision, CHECKPOINT may also be any weights --weights takes: a converted
    or timm folder, a .safetensors file, a registry name, bundled:NAME, hf-hub:org/name[@rev].
    """
    _check_out_kind(out_dir, to)
    if to != "folder":
        _convert_for_framework(checkpoint, out_dir, to, arch=arch, source=source, overwrite=overwrite)
        return
    if Path(checkpoint).is_dir():
        raise click.UsageError(f"{checkpoint} is a folder already; --to detectron2|torchvision exports it")
    from mec_hub.export.convert import convert_checkpoint

    result = convert_checkpoint(checkpoint, out_dir, arch=arch, source=source, name=name, overwrite=overwrite)
    click.echo(f"read {checkpoint} ({result.layout}); wrote {result.folder}")
    if result.dropped:
        click.echo(f"dropped classifier keys: {', '.join(result.dropped)}")
    for fname, digest in result.digests.items():
        click.echo(f"  {fname}  sha256 {digest}")
    click.echo(
        "registry fields: "
        + json.dumps(
            {
                "architecture": result.config.architecture,
                "num_features": result.config.num_features,
                "projector": result.config.projector,
                "files": result.digests,
            }
        )
    )


def _check_out_kind(out: str, to: str) -> None:
    """--out names a folder for --to folder and a file otherwise: the other kind already there is bad
    usage, which --overwrite does not cure (it replaces a folder by a folder and a file by a file)."""
    path = Path(out)
    if to == "folder" and path.exists() and not path.is_dir():
        raise click.UsageError(f"--out {out} is a file; --to folder writes a folder")
    if to != "folder" and path.is_dir():
        raise click.UsageError(f"--out {out} is a folder; --to {to} writes a file")


def _convert_for_framework(
    checkpoint: str, out: str, framework: str, *, arch: str | None, source: str, overwrite: bool
) -> None:
    from mec_hub.export.transfer import export_backbone

    result = export_backbone(checkpoint, framework, out, source=source, arch=arch, overwrite=overwrite)
    click.echo(
        f"read {checkpoint} ({result.layout}); wrote {result.out}: {result.num_tensors} tensors of the "
        f"{result.architecture} backbone for {framework}"
    )
    if result.dropped:
        click.echo(f"dropped classifier keys: {', '.join(result.dropped)}")
    if result.config_lines:
        click.echo("Detectron2 config:")
        for line in result.config_lines:
            click.echo(f"  {line.replace('<this file>', str(result.out))}")


@click.command("push", short_help="Upload a converted folder to the Hugging Face Hub.")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--repo-id", required=True, help="Hugging Face repo, e.g. org/mec_resnet50.in1k_ep100.")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", default=None, help="Branch to push to, created from main if missing (default: main).")
@click.option("--message", "commit_message", default=None, help="Commit message.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded and stop.")
@click.option("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co).")
@friendly_errors
def push_cmd(
    folder: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    dry_run: bool,
    endpoint: str | None,
) -> None:
    """Upload a converted FOLDER to the Hugging Face Hub (after checking its files against config.json)."""
    from mec_hub.export.publish import push_folder

    result = push_folder(
        Path(folder),
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        dry_run=dry_run,
        endpoint=endpoint,
    )
    for fname, size, digest in result.files:
        click.echo(f"  {fname:<24} {size:>12,d} bytes  sha256 {digest}")
    if dry_run:
        click.echo(f"dry run: would upload {len(result.files)} files to {repo_id}; nothing was sent")
    else:
        click.echo(f"pushed to {result.url} (commit {result.commit})")
        click.echo(f"pin it: hf_repo_id={repo_id!r}, hf_revision={result.commit!r}")
