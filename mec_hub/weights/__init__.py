"""Weights as data: the published-folder description (``config``), the registry and its zoo,
fetching from any location (``sources``) and SHA-256 verification (``integrity``).

Nothing here builds a network: ``mec_hub.models`` does that from what this package describes.
"""
