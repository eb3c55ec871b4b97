"""torch.hub entry points: ``torch.hub.load("<owner>/mec-hub", "mec_resnet50")``.

Offline, from a clone: ``torch.hub.load(repo_dir, "mec_resnet50", source="local", weights=PATH)``.
Arguments are keywords, as torchvision's: ``weights="DEFAULT"`` (or ``None``, the default) is the
published weights, ``pretrained=False`` random weights (see ``mec_hub.models.hub_entrypoints``).
"""

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]

from mec_hub.models.hub_entrypoints import mec_resnet18_cifar10s, mec_resnet50  # noqa: E402, F401
