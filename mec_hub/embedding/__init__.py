"""Embedding images at scale: the engine behind ``mec-embed`` and ``mec_hub.Embedder``.

One job per module: ``inputs`` (folders, files, globs and list files -> the ordered image list),
``loader`` (decoding in DataLoader workers), ``runner`` (ordered batches through a model, and
recovery from a decoder that crashes or hangs), ``engine`` (``Embedder``: the model, its forward,
``embed``), ``job`` (the resumable run writing a feature file, ``mec_hub.data.featurefile``),
``npy_writer``, ``checkpoint``, ``outputs`` and ``optimize`` (BatchNorm folding).

Data flows one way: ``engine`` -> ``runner`` -> ``loader``, and ``engine`` -> ``job``, which
knows the embedder only through the ``job.JobEmbedder`` protocol. Importing this package imports
nothing heavy.
"""

DEFAULT_BATCH_SIZE = 64
