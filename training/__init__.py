"""MEC pretraining: the official recipe and the ``pretrain.py`` entry point.

The loss (``mec_hub.MECLoss``, ``mec_hub.coding_length``) and the projector and predictor heads
live in the installed package; this folder is the recipe. Modules, each readable on its own: ``model`` (student,
EMA teacher, predictor), ``data`` (image folder, MoCo v3 views, global-batch sampler),
``schedules`` (lr, teacher momentum, lamda), ``optim`` (SGD, LARS), ``engine`` (one training
step), ``recipe`` (what the options make), ``loop`` (the training loop), ``checkpoint`` (the file
format) and ``resume`` (what a run saves, resuming, the export), ``config`` (the options),
``metrics``, ``monitor`` (kNN), ``distributed`` and ``pretrain`` (the command line).
"""
