"""``mec-hub cache``: the ONNX exports (and int8 models) mec-embed made of models, listed and removed."""

from __future__ import annotations

import time

import click

from mec_hub.cli.common import friendly_errors

HELP = """The exports mec-embed makes of a model to run it with ONNX Runtime (and its int8 models), kept
in MEC_HUB_CACHE/onnx (default ~/.cache/mec_hub/onnx), one folder per model, head, input size and
versions of torch, onnx, onnxscript and onnxruntime: an upgrade makes new ones and the old ones are
never read again. Downloaded weights are kept by huggingface_hub (see `huggingface-cli delete-cache`).
"""


@click.group("cache", help=HELP, short_help="List or clear the ONNX exports mec-embed keeps.")
def cache_group() -> None:
    """``mec-hub cache``: its help is ``HELP``."""


@cache_group.command("list", short_help="Each entry: kind, model, size, last use, usable or not.")
@friendly_errors
def list_cmd() -> None:
    """Every entry: kind, model, size, last use, and whether the installed versions can use it."""
    from mec_hub.export.onnx_cache import export_cache_dir, list_entries

    entries = list_entries()
    if not entries:
        click.echo(f"{export_cache_dir()}: empty")
        return
    click.echo(f"{export_cache_dir()}:")
    for entry in entries:
        key = entry.key or {}
        what = (
            f"{key.get('architecture', '?')} {key.get('head', '?')} {'x'.join(map(str, key.get('input_size', [])))}"
            if entry.kind == "onnx-fp32"
            else f"int8 of {key.get('fp32_entry', '?')}, {key.get('calibration_images', '?')} calibration images"
            if entry.kind == "onnx-int8"
            else "no readable key.json"
        )
        state = "current" if entry.current else "unusable (other versions)" if entry.key else "damaged"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        click.echo(f"  {entry.folder.name}  {entry.kind:9}  {entry.size_bytes / 1e6:8.1f} MB  {used}  {state}: {what}")
    click.echo(f"{_count(len(entries))}, {sum(e.size_bytes for e in entries) / 1e6:.1f} MB")


def _count(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


@cache_group.command("clear", short_help="Remove entries that cannot be used (--all: every entry).")
@click.option("--all", "everything", is_flag=True, help="Remove every entry, not only the unusable ones.")
@friendly_errors
def clear_cmd(everything: bool) -> None:
    """Remove the entries the installed versions cannot use (made by other versions, or damaged); with
    --all, every entry (the next run of each model exports it again)."""
    from mec_hub.export.onnx_cache import list_entries, remove_entry

    doomed = [entry for entry in list_entries() if everything or not entry.current]
    for entry in doomed:
        remove_entry(entry)
    click.echo(f"removed {_count(len(doomed))}, {sum(e.size_bytes for e in doomed) / 1e6:.1f} MB")
