"""Two processes (gloo, CPU) against one process on the joined batch: loss, input gradients, DDP gradients,
and whole pretraining runs of training/pretrain.py."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import training.pretrain as pretrain
from mec_hub.models.losses import MECLoss
from tests.support.pretraining import WORLD, pretrain_arguments
from training.model import MECModel, build_mec_model

M, D_IN, D = 8, 5, 12  # global batch, model input, embedding


class TwoViews(nn.Module):
    """A stand-in for the student: one module called on both views in a single forward, as MECModel does."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D_IN, D, dtype=torch.float64)

    def forward(self, x1, x2):
        return self.linear(x1), self.linear(x2)


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x1, x2 = (
        torch.randn(M, D_IN, generator=g, dtype=torch.float64),
        torch.randn(M, D_IN, generator=g, dtype=torch.float64),
    )
    p1 = torch.randn(M, D, generator=g, dtype=torch.float64)
    z1 = p1 + 0.5 * torch.randn(M, D, generator=g, dtype=torch.float64)
    p2 = torch.randn(M, D, generator=g, dtype=torch.float64)
    z2 = p2 + 0.5 * torch.randn(M, D, generator=g, dtype=torch.float64)
    return {"x1": x1, "x2": x2, "p1": p1, "z1": z1, "p2": p2, "z2": z2}


def one_process_reference(inputs):
    p1, p2 = inputs["p1"].clone().requires_grad_(), inputs["p2"].clone().requires_grad_()
    out = MECLoss(warn_on_divergence=False)(p1, inputs["z1"], p2, inputs["z2"])
    out.loss.backward()
    torch.manual_seed(1)
    model = TwoViews()
    q1, q2 = model(inputs["x1"], inputs["x2"])
    MECLoss(warn_on_divergence=False)(q1, inputs["z1"], q2, inputs["z2"]).loss.backward()
    return {
        "loss": out.loss.detach(),
        "coding_length": out.coding_length,
        "p1_grad": p1.grad,
        "p2_grad": p2.grad,
        "model_grads": [p.grad for p in model.parameters()],
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        inputs = make_inputs()
        rows = slice(rank * M // WORLD, (rank + 1) * M // WORLD)
        local = {k: v[rows].clone() for k, v in inputs.items()}
        p1, p2 = local["p1"].requires_grad_(), local["p2"].requires_grad_()
        criterion = MECLoss(gather_distributed=True, warn_on_divergence=False)
        out = criterion(p1, local["z1"], p2, local["z2"])
        out.loss.backward()

        torch.manual_seed(1)
        model = nn.parallel.DistributedDataParallel(TwoViews())
        q1, q2 = model(local["x1"], local["x2"])
        criterion(q1, local["z1"], q2, local["z2"]).loss.backward()
        torch.save(
            {
                "loss": out.loss.detach(),
                "coding_length": out.coding_length,
                "p1_grad": p1.grad,
                "p2_grad": p2.grad,
                "model_grads": [p.grad for p in model.module.parameters()],
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_two_processes_give_the_one_process_loss(two_process_results):
    reference = one_process_reference(make_inputs())
    for result in two_process_results:
        torch.testing.assert_close(result["loss"], reference["loss"], rtol=1e-12, atol=0)
        torch.testing.assert_close(result["coding_length"], reference["coding_length"], rtol=1e-12, atol=0)


def test_input_gradients_are_the_one_process_gradients_summed_over_ranks(two_process_results):
    # Every rank computes the same global loss, so the gather's backward (a sum over ranks) hands
    # each rank WORLD times its slice of the joined-batch gradient; DDP's mean over ranks undoes it.
    reference = one_process_reference(make_inputs())
    for rank, result in enumerate(two_process_results):
        rows = slice(rank * M // WORLD, (rank + 1) * M // WORLD)
        for name in ("p1_grad", "p2_grad"):
            torch.testing.assert_close(result[name] / WORLD, reference[name][rows], rtol=1e-10, atol=1e-15)


def test_ddp_parameter_gradients_equal_the_one_process_gradients(two_process_results):
    reference = one_process_reference(make_inputs())
    for result in two_process_results:
        for got, want in zip(result["model_grads"], reference["model_grads"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-15)


# --------------------------------------------------------------------------------------------
# training/pretrain.py: two processes against one


def _per_sample_batch_norm(build: Callable[..., MECModel]) -> Callable[..., MECModel]:
    """``build_mec_model`` whose BatchNorms normalise with their (fixed) running statistics.

    On CPU each process normalises its own share of the batch (SyncBatchNorm needs GPUs), which
    makes any two-process run differ from a one-process one by design. With per-sample
    normalisation everything else a run does (data split, augmentations, loss gather, gradient
    averaging, schedules, optimizer, teacher) must give the one-process weights.
    """

    def build_without_batch_statistics(*args: Any, **kwargs: Any) -> MECModel:
        model = build(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return model

    return build_without_batch_statistics


def _pretrain_worker(rank: int, port: int, images: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    pretrain.build_mec_model = _per_sample_batch_norm(pretrain.build_mec_model)
    assert pretrain.main(pretrain_arguments(Path(images), Path(out))) == 0


@pytest.mark.slow
def test_pretraining_on_two_processes_reaches_the_one_process_weights(images, tmp_path, monkeypatch):
    two, one = tmp_path / "two", tmp_path / "one"
    mp.spawn(_pretrain_worker, args=(free_port(), str(images), str(two)), nprocs=WORLD, join=True)
    monkeypatch.setattr(pretrain, "build_mec_model", _per_sample_batch_norm(pretrain.build_mec_model))
    assert pretrain.main(pretrain_arguments(images, one)) == 0

    got, want = (torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True) for out in (two, one))
    assert (got["step"], got["world_size"], want["world_size"]) == (4, WORLD, 1)
    assert got["model"].keys() == want["model"].keys()
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    for index, state in want["optimizer"]["state"].items():
        buffer = got["optimizer"]["state"][index]["momentum_buffer"]
        torch.testing.assert_close(buffer, state["momentum_buffer"], rtol=0, atol=1e-6)
    # The runs moved the student, the predictor and the teacher beyond the tolerance.
    torch.manual_seed(0)  # --seed
    initial = build_mec_model("test_resnet", dim=32, hidden_dim=64, pred_dim=16).state_dict()
    for key in ("student.backbone.conv1.0.weight", "teacher.backbone.conv1.0.weight", "predictor.3.weight"):
        assert (want["model"][key] - initial[key]).abs().max() > 1e-5, key
