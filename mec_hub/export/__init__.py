"""Weights out of mec-hub: converting checkpoints into the published folder (``convert``), its
model card (``modelcard``) and publishing to the Hugging Face Hub (``publish``)."""
