"""Command-line interfaces: ``mec-hub`` (models, conversion, evaluation) and ``mec-embed``.

Modules here import only click at import time so that ``--help`` answers without torch.
"""
