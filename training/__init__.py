"""MEC pretraining: the coding-length loss, the official recipe, and the ``pretrain.py`` entry point.

Modules, each readable on its own: ``loss`` (coding length, ``MECLoss``), ``model`` (student,
EMA teacher, predictor), ``data`` (image folder, MoCo v3 views, global-batch sampler),
``schedules`` (lr, teacher momentum, lamda), ``optim`` (SGD, LARS), ``engine`` (one training
step), ``checkpoint``, ``metrics``, ``monitor`` (kNN), ``distributed`` and ``pretrain`` (the
command line).
"""
