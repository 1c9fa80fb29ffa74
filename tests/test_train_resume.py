"""A training killed mid-way resumes at its last epoch boundary and ends with exactly the
weights of a training that never stopped (what the teacher stage relies on)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from modelpress.train import distill, loader, train_classifier

pytestmark = pytest.mark.unit


def _setup():
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, loader(TensorDataset(x, y), 32, True, seed=5)


class Killed(Exception):
    pass


def _train(on_step=None, on_epoch=None, resume=None, scramble=False):
    model, batches = _setup()
    if scramble:  # a resumed run must take every weight from the saved state
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    train_classifier(model, batches, 3, 0.1, optimizer="sgd", weight_decay=5e-4, warmup_frac=0.05,
                     on_step=on_step, on_epoch=on_epoch, resume=resume)
    return model


def _killed_at(run, step_of_kill: int) -> list[dict]:
    """The states ``run`` saved at its epoch boundaries (through torch.save and weights_only=True,
    as the stages write them) before it was killed after step ``step_of_kill``."""
    saved = []

    def keep(state):
        buf = io.BytesIO()
        torch.save(state, buf)
        saved.append(buf.getvalue())

    def kill(step, _total):
        if step == step_of_kill:
            raise Killed

    with pytest.raises(Killed):
        run(on_step=kill, on_epoch=keep)
    return [torch.load(io.BytesIO(b), weights_only=True) for b in saved]


def test_resume_at_an_epoch_boundary_is_bit_identical():
    reference = _train()
    saved = _killed_at(_train, 8 * 2 + 3)  # in the third epoch (8 batches an epoch)
    assert len(saved) == 2  # after epochs 1 and 2
    state = saved[-1]
    assert state["step"] == 16
    steps = []
    resumed = _train(resume=state, scramble=True, on_step=lambda step, _t: steps.append(step))
    assert steps == list(range(17, 25))  # only the third epoch ran again
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def _distill(on_step=None, on_epoch=None, resume=None):
    torch.manual_seed(0)
    x = torch.randn(192, 1, 8, 8)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    batches = loader(TensorDataset(x, torch.zeros(192, dtype=torch.long)), 32, True, seed=5)
    torch.manual_seed(123)  # what the run's dropout draws from; a resumed run comes back with the saved state
    distill(student, teacher, batches, student.parameters(), 3, 0.05, augment=True, seed=7,
            on_step=on_step, on_epoch=on_epoch, resume=resume)
    return student


def test_distillation_with_augmentation_and_dropout_resumes_bit_identical():
    """What the fine-tuning stage relies on: the flips and shifts of the augmentation and the
    dropout's draws come back with the saved state, not only the weights and the batch order."""
    reference = _distill()
    state = _killed_at(_distill, 6 * 2 + 2)[-1]  # in the third epoch (6 batches an epoch)
    assert state["step"] == 12
    resumed = _distill(resume=state)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
