"""What an encoder outputs, its ``head``: the one list of head names, importable without torch
(the command lines offer it as a choice, and they start without importing torch).

``"backbone"``: the pooled backbone features (what linear probes and kNN use); ``"projector"``:
the MEC projector's output after them, the space the MEC loss was computed in
(``mec_hub.models.encoder.MECEncoder``).
"""

from __future__ import annotations

HEADS = ("backbone", "projector")
#: The head wherever one is chosen and none is given.
DEFAULT_HEAD = HEADS[0]
