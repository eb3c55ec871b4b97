"""What int8 embedding must reach against fp32, and the figures it reports: importable without torch
or numpy (``mec-embed --help`` states the targets, and its summary prints the figures).

``mec_hub.export.quantize`` calibrates and measures; the targets, the sample sizes and the record of
an agreement live here, once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: Images of the user's collection the quantization is calibrated (and checked) on, by default.
CALIBRATION_IMAGES = 256
#: Fewer images than this calibrate too little, and make recall@10 meaningless.
MIN_CALIBRATION_IMAGES = 16
#: What an int8 model must reach against fp32 on the calibration images, or it is refused.
TARGETS = {"cosine_mean": 0.99, "recall_at_10": 0.95}
RECALL_K = 10


def targets_text() -> str:
    """The targets in words, as the help and the README state them."""
    return f"mean cosine >= {TARGETS['cosine_mean']}, recall@10 >= {TARGETS['recall_at_10']}"


@dataclass(frozen=True)
class Agreement:
    """How the int8 model's vectors compare with fp32's on the calibration images."""

    images: int
    cosine_mean: float
    cosine_min: float
    recall_at_10: float

    def misses(self) -> list[str]:
        """The targets missed, in words (empty: all met)."""
        out = []
        if not self.cosine_mean >= TARGETS["cosine_mean"]:
            out.append(f"mean cosine {self.cosine_mean:.4f} < {TARGETS['cosine_mean']}")
        if not self.recall_at_10 >= TARGETS["recall_at_10"]:
            out.append(f"recall@10 {self.recall_at_10:.3f} < {TARGETS['recall_at_10']}")
        return out

    def summary(self) -> str:
        return (
            f"int8 against fp32 on {self.images} calibration images: cosine mean {self.cosine_mean:.4f}, "
            f"min {self.cosine_min:.4f}; recall@10 {self.recall_at_10:.3f}"
        )

    def to_json(self) -> dict[str, Any]:
        return {key: (round(value, 6) if isinstance(value, float) else value) for key, value in asdict(self).items()}
