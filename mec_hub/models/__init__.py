"""Networks: the timm backbone and ``MECEncoder`` (``encoder``), the projector and predictor
(``heads``), the MEC loss (``losses``), ``mec_hub.load`` (``loading``) and the torch.hub entry
points (``hub_entrypoints``)."""
