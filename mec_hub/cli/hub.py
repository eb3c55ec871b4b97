"""``mec-hub``: published models, conversion, export, publishing, evaluation, search, indexes, the browser and plots."""

from __future__ import annotations

import click

from mec_hub import __version__
from mec_hub.cli.cache import cache_group
from mec_hub.cli.common import show_warnings_briefly
from mec_hub.cli.evaluate import eval_group
from mec_hub.cli.export import export_cmd
from mec_hub.cli.index import index_cmd
from mec_hub.cli.models import convert_cmd, download_cmd, info_cmd, list_cmd, push_cmd
from mec_hub.cli.plot import plot_cmd
from mec_hub.cli.search import search_cmd
from mec_hub.cli.serve import serve_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mec-hub")
def main() -> None:
    """Maximum Entropy Coding (MEC) models and their features.

    Models: list, info, download, convert, export (ONNX, pt2, TorchScript), push (Hugging Face Hub),
    eval (kNN, linear, fine-tuning). Feature sets that mec-embed writes (FEATS.npy or FEATS.parquet):
    search, index (FAISS), serve (a neighbour browser). Training runs: plot. The ONNX exports mec-embed
    keeps: cache. Images are embedded by mec-embed, models pretrained by training/pretrain.py.
    """
    show_warnings_briefly()


for command in (list_cmd, info_cmd, download_cmd, convert_cmd, export_cmd, push_cmd, eval_group, search_cmd, plot_cmd):
    main.add_command(command)
main.add_command(index_cmd)
main.add_command(serve_cmd)
main.add_command(cache_group)

if __name__ == "__main__":
    main()
