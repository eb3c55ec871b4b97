"""Pixels and rows on disk: the one image decode path (``images``), the evaluation transform and
normalisation constants (``transforms``) and the feature-file format (``featurefile``).

Training, embedding, evaluation and search all read images through ``images.decode_image``, so a
model is served the same pixels it was trained on.
"""
