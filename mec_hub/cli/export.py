"""``mec-hub export``: an ONNX, torch.export (pt2) or TorchScript file of a model, with its preprocessing beside it."""

from __future__ import annotations

import click

from mec_hub.cli.common import friendly_errors, option
from mec_hub.models.head_names import DEFAULT_HEAD, HEADS


@click.command("export", short_help="Export a model to ONNX, torch.export (pt2) or TorchScript.")
@click.argument("weights")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "pt2", "export", "torchscript"]),
    required=True,
    help="onnx: for ONNX Runtime, TensorRT, OpenVINO...; pt2 (alias: export): a torch.export program for "
    "torch.export.load(FILE).module(), any batch size; torchscript: for torch.jit.load (C++ or Python), "
    "deprecated by PyTorch (prefer pt2), kept while torch ships it.",
)
@option("out", required=True, type=click.Path(dir_okay=False), help="The file to write (FILE.json beside it).")
@click.option("--head", type=click.Choice(HEADS), default=DEFAULT_HEAD, show_default=True)
@click.option("--dynamic-batch", is_flag=True, help="ONNX: take any batch size (otherwise batch 1).")
@click.option("--opset", type=click.IntRange(min=1), default=None, help="ONNX opset.  [default: 18, the minimum]")
@click.option("--sha256", default=None, metavar="HEX", help="The SHA-256 you trust for the weights' model file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing FILE and FILE.json.")
@friendly_errors
def export_cmd(
    weights: str,
    fmt: str,
    out: str,
    head: str,
    dynamic_batch: bool,
    opset: int | None,
    sha256: str | None,
    overwrite: bool,
) -> None:
    """Export WEIGHTS (a registry name, converted folder, .safetensors file, hf-hub:org/name[@rev]
    or URL, verified as for loading) to a file mapping normalised (N, 3, H, W) float32 images to
    the (N, D) embedding.

    FILE.json beside it holds the preprocessing (pretrained_cfg, as in config.json, and
    export.preprocessing: the resize rule, centre crop, scaling, mean and std, channel order and
    layout as explicit fields) and the export's details (input and output names, head, D, the
    file's SHA-256). The file is checked against the PyTorch model before it is written. `mec-embed
    --runtime onnxruntime --weights FILE.onnx` embeds images with an ONNX export.

    TorchScript is deprecated by PyTorch: prefer --format pt2 (torch.export).
    """
    from mec_hub.export.deploy import ANY_BATCH_FORMATS, export_model

    fmt = {"export": "pt2"}.get(fmt, fmt)
    result = export_model(
        weights, out, fmt=fmt, head=head, dynamic_batch=dynamic_batch, opset=opset, overwrite=overwrite, sha256=sha256
    )
    c, h, w = result.input_size
    batch = "N" if dynamic_batch or fmt in ANY_BATCH_FORMATS else "1"
    click.echo(f"wrote {result.path} ({fmt}): ({batch}, {c}, {h}, {w}) float32 -> ({batch}, {result.embed_dim})")
    click.echo(f"  sha256 {result.sha256}")
    click.echo(f"  preprocessing and details: {result.sidecar}")
    if result.max_rel_diff is not None:
        click.echo(f"  max relative difference to PyTorch on random batches: {result.max_rel_diff:.2e}")
