"""The training model (keys, teacher, EMA), optimizers, checkpoint helpers, metrics log and step statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mec_hub.models.losses import MECLossOutput
from mec_hub.weights.checkpoint import TRAIN_FORMAT
from training import checkpoint as ckpt
from training.engine import NonFiniteLossError, StepStats
from training.metrics import MetricsLog, read_metrics
from training.model import build_mec_model
from training.optim import LARS, build_optimizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_mec_model("resnet10t", dim=32, hidden_dim=48, pred_dim=16)


def test_state_dict_keys_are_the_convert_layout(model):
    groups = {".".join(k.split(".")[:2]) if not k.startswith("predictor.") else "predictor" for k in model.state_dict()}
    assert groups == {"student.backbone", "student.projector", "teacher.backbone", "teacher.projector", "predictor"}
    projector = model.student.projector
    assert (projector[0].in_features, projector[0].out_features, projector[6].out_features) == (512, 48, 32)
    assert isinstance(projector[7], nn.BatchNorm1d) and not projector[7].affine
    assert model.predictor[0].out_features == 16 and model.predictor[3].out_features == 32


def test_teacher_is_a_frozen_copy_of_the_student(model):
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    assert student.keys() == teacher.keys()
    for key in student:
        assert torch.equal(student[key], teacher[key])
        assert student[key].data_ptr() != teacher[key].data_ptr()
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for n, p in model.student.named_parameters() if n != "projector.6.bias")


def test_forward_gives_predictions_with_grad_and_teacher_targets_without(model):
    torch.manual_seed(1)
    before = model.teacher.backbone.bn1.running_mean.clone()
    p1, p2, z1, z2 = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert p1.shape == p2.shape == z1.shape == z2.shape == (4, 32)
    assert p1.requires_grad and not z1.requires_grad
    # The teacher runs in train mode, like the official one: batch statistics, updated running stats.
    assert not torch.equal(before, model.teacher.backbone.bn1.running_mean)


def test_ema_update_matches_the_formula_on_parameters_only():
    torch.manual_seed(2)
    m = build_mec_model("resnet10t", dim=8, hidden_dim=8, pred_dim=4)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    teacher = {k: v.clone() for k, v in m.teacher.named_parameters()}
    student = dict(m.student.named_parameters())
    buffers = {k: v.clone() for k, v in m.teacher.named_buffers()}
    m.update_teacher(0.9)
    for name, param in m.teacher.named_parameters():
        torch.testing.assert_close(param, 0.9 * teacher[name] + 0.1 * student[name].detach(), rtol=1e-6, atol=1e-7)
    for name, buffer in m.teacher.named_buffers():
        assert torch.equal(buffer, buffers[name])


def test_sgd_leaves_out_frozen_parameters(model):
    optimizer = build_optimizer("sgd", model, lr=0.1, momentum=0.9, weight_decay=1e-5)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.student.projector[6].bias) not in trained
    assert not trained & {id(p) for p in model.teacher.parameters()}
    assert len(trained) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="--optimizer"):
        build_optimizer("adam", model, lr=0.1, momentum=0.9, weight_decay=0.0)


def test_lars_step_matches_a_per_parameter_reference():
    torch.manual_seed(3)
    params = [
        torch.randn(5, 4, requires_grad=True),
        torch.randn(5, requires_grad=True),
        torch.zeros(3, 2, requires_grad=True),
    ]
    grads = [torch.randn_like(p) for p in params]
    expected = []
    for p, g in zip(params, grads, strict=True):  # two steps, written out
        w, buf = p.detach().clone(), torch.zeros_like(p)
        for _ in range(2):
            update = g.clone()
            if w.ndim > 1:
                update = update + 1e-4 * w
                wn, un = w.norm(), update.norm()
                if wn > 0 and un > 0:
                    update = update * (0.001 * wn / un)
            buf = 0.9 * buf + update
            w = w - 0.5 * buf
        expected.append(w)
    optimizer = LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- checkpoint helpers


def test_checkpoint_round_trip_with_weights_only_and_snapshots(tmp_path, model):
    state = {"format": TRAIN_FORMAT, "model": model.state_dict(), "step": 3, "config": {"lr": 0.5, "order": None}}
    ckpt.assert_weights_only_safe(state)
    ckpt.save(tmp_path / ckpt.LAST, state)
    loaded = torch.load(tmp_path / ckpt.LAST, weights_only=True)
    assert loaded["step"] == 3 and torch.equal(
        loaded["model"]["predictor.0.weight"], state["model"]["predictor.0.weight"]
    )
    for epoch in (10, 20, 30):
        ckpt.keep_snapshot(tmp_path, epoch, keep=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch*.pt")) == [
        "checkpoint_epoch0020.pt",
        "checkpoint_epoch0030.pt",
    ]
    ckpt.save(tmp_path / ckpt.LAST, {**state, "step": 4})  # replacing the last keeps the snapshot
    assert torch.load(tmp_path / "checkpoint_epoch0030.pt", weights_only=True)["step"] == 3
    assert not list(tmp_path.glob(".*tmp"))


def test_values_torch_load_would_refuse_are_caught_with_their_path():
    with pytest.raises(TypeError, match=r"\['versions'\]\['torch'\].*TorchVersion"):
        ckpt.assert_weights_only_safe({"versions": {"torch": torch.__version__}})
    with pytest.raises(TypeError, match=r"\['path'\] is a PosixPath"):
        ckpt.assert_weights_only_safe({"path": Path(".")})


def test_resume_check_lists_the_differing_options():
    saved = {key: 1 for key in ckpt.RECIPE_KEYS}
    ckpt.check_resumable(saved, dict(saved), path=Path("OUT/checkpoint_last.pt"))
    with pytest.raises(ckpt.ResumeMismatchError, match=r"--lr: checkpoint 1, command 2") as info:
        ckpt.check_resumable(saved, {**saved, "lr": 2, "num_images": 5}, path=Path("OUT/checkpoint_last.pt"))
    assert "number of images in --data: checkpoint 1, command 5" in str(info.value)
    assert "--output-dir" in str(info.value)


def test_metrics_log_drops_lines_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "step", "step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"kind": "step", "st')  # a torn last line
    log = MetricsLog(tmp_path, resume_step=2, tensorboard=False)
    log.write({"kind": "step", "step": 3, "loss": math.nan})
    log.close()
    records = read_metrics(path)
    # Lines after the checkpoint's step go; a resume line marks where the run picked up (for plots).
    assert [(r["kind"], r["step"]) for r in records] == [("step", 1), ("step", 2), ("resume", 2), ("step", 3)]
    assert records[-1]["loss"] is None  # NaN is not JSON
    MetricsLog(tmp_path, resume_step=0, tensorboard=False)
    assert path.read_text() == ""


def test_step_stats_name_the_first_non_finite_step():
    stats = StepStats(first_step=10)
    good = MECLossOutput(torch.tensor(-1.0), torch.tensor(2.0), torch.tensor(0.5))
    stats.add(good)
    stats.add(MECLossOutput(torch.tensor(-3.0), torch.tensor(4.0), torch.tensor(0.7)))
    summary = stats.flush(steps_per_epoch=4)
    assert summary == {"loss": -2.0, "coding_length": 3.0, "spectral_norm": pytest.approx(0.7)}
    stats.add(good)
    stats.add(MECLossOutput(torch.tensor(math.nan), torch.tensor(math.nan), torch.tensor(0.5)))
    with pytest.raises(NonFiniteLossError, match=r"at step 14 \(epoch 4, step 2 of 4\).*lower --lr"):
        stats.check_finite(steps_per_epoch=4, advice="Try a lower --lr.")


def test_small_image_stem_builds_and_exports(tmp_path):
    import mec_hub
    from mec_hub.export.convert import extract_weights, write_hub_folder

    torch.manual_seed(4)
    small = build_mec_model("resnet18", stem="small", dim=16, hidden_dim=32, pred_dim=8)
    assert small.student.backbone.conv1.kernel_size == (3, 3) and isinstance(
        small.student.backbone.maxpool, nn.Identity
    )
    p1, _, z1, _ = small(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    assert p1.shape == z1.shape == (2, 16)
    state = {"format": TRAIN_FORMAT, "arch": "resnet18", "model_args": {}, "stem": "small", "model": small.state_dict()}
    write_hub_folder(extract_weights(state), tmp_path / "export", name="tiny_small_stem")
    loaded = mec_hub.load(weights=tmp_path / "export")
    small.student.backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small.student.backbone(x))
