"""Command-line interfaces: ``mec-hub`` (models, conversion, evaluation) and ``mec-embed``.

Modules here import only click (and the light ``mec_hub.errors``/``fileio``) at import time; each
command imports the modules that do its work when it runs. Measured 2026-12-05 on the 2-core VM:
``mec-hub --help`` answers in 0.05 s, where importing the work modules (torch, timm, the
evaluation, FAISS's wrapper) takes 3.2 s. So every import inside a command function of this
package is deferred for that reason, and only that one.
"""
