"""Weights as data: one model description (``config.ModelConfig``, the published folder's
``config.json``), a registry entry (``record.ModelRecord``: that description and where it is
published), the published models (``zoo``) and the registry that lists them (``registry``),
fetching from any location (``sources``), whether a download server answers at all (``reach``)
and SHA-256 verification (``integrity``).

Imports point one way: config <- record <- zoo <- registry <- sources. Nothing here builds a
network: ``mec_hub.models`` does that from what this package describes.
"""
