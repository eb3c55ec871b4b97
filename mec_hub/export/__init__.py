"""Weights out of mec-hub: converting checkpoints into the published folder (``convert``), its
model card (``modelcard``), publishing to the Hugging Face Hub (``publish``), the backbone in
other frameworks' layouts (``transfer``: ``detectron2``, ``torchvision_weights``) and deployment
files (``deploy``: ONNX, torch.export, TorchScript). Every output is written through ``outputs`` (checked
before the work, one clear error when it cannot be written)."""
