"""Weights out of mec-hub: converting checkpoints into the published folder (``convert``), its
model card (``modelcard``), publishing to the Hugging Face Hub (``publish``), and the backbone in
other frameworks' layouts (``transfer``: ``detectron2``, ``torchvision_weights``)."""
