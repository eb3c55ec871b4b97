"""Embedding images at scale: the engine behind ``mec-embed`` and ``mec_hub.Embedder``.

One job per module: ``images`` (decode any file to RGB, or say why not), ``inputs`` (folders,
files, globs and list files -> the ordered image list), ``loader`` (decoding in DataLoader
workers), ``engine`` (``Embedder``), ``job`` (the resumable run writing ``.npy`` + paths + meta),
``npy_writer``, ``checkpoint``, ``outputs``, ``distributed`` (torchrun slices), ``devices`` and
``optimize`` (BatchNorm folding). Importing this package imports nothing heavy.
"""

DEFAULT_BATCH_SIZE = 64
