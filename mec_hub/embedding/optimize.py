"""Inference-only rewrites of a model that keep its outputs (up to float rounding) and save time.

``fold_batchnorm``: an eval-mode ``BatchNorm2d`` right after a ``Conv2d`` is an affine map per
channel, so it can be folded into the convolution's weights and bias (as timm, torchvision and
ONNX exporters do for deployment). On a CPU this removes a full pass over every activation of a
ResNet; it is the largest single gain after the channels-last layout. Models that
``torch.fx`` cannot trace, or that have no such pair, are returned unchanged.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """(a copy of ``module`` with each Conv2d -> BatchNorm2d pair folded into one Conv2d, pairs folded).

    Only exact ``nn.Conv2d`` / ``nn.BatchNorm2d`` pairs whose convolution output feeds nothing
    else are folded (subclasses such as timm's ``BatchNormAct2d`` or padded ``Conv2dSame`` do
    more than their base class and are left alone). ``module`` itself is not modified.
    """
    try:
        traced = fx.symbolic_trace(copy.deepcopy(module).eval())
    except Exception:  # control flow on tensors, unsupported ops: run the model as it is
        return module, 0
    modules = dict(traced.named_modules())
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    folded = 0
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.BatchNorm2d:
            continue
        conv_node = node.args[0]
        if not isinstance(conv_node, fx.Node) or conv_node.op != "call_module":
            continue
        conv, bn = modules.get(conv_node.target), modules[node.target]
        shared = calls[conv_node.target] != 1 or calls[node.target] != 1 or len(conv_node.users) != 1
        if type(conv) is not nn.Conv2d or shared or bn.running_mean is None or bn.running_var is None:
            continue
        parent, _, name = str(conv_node.target).rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, name, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(conv_node)
        traced.graph.erase_node(node)
        folded += 1
    if not folded:
        return module, 0
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced, folded
