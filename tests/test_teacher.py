"""The teacher step with given weights: safe loading, checksums, real pretrained files."""

from __future__ import annotations

import os

import pytest
import torch

from modelpress import stages
from modelpress.data import sha256_file
from modelpress.pack import load_packed

from helpers import shared_data, tiny_recipe

pytestmark = pytest.mark.pipeline



class NotWeights:  # a pickled object that weights_only=True must refuse to build
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_teacher_from_checkpoint_is_loaded_not_trained(workdir, tmp_path):
    trained, _ = load_packed(workdir / "teacher" / "teacher.mpk")
    ckpt = tmp_path / "teacher.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, ckpt)
    out = tmp_path / "out"
    recipe = tiny_recipe(out, teacher={"weights": str(ckpt), "weights_sha256": sha256_file(ckpt)})
    (out / "datasets").mkdir(parents=True)
    os.symlink(workdir / "datasets" / "fashion-mnist", out / "datasets" / "fashion-mnist")
    stages.teacher(recipe)
    info = stages.read_json(stages.paths(recipe)["teacher_info"])
    assert info["trained"] is False and info["source"] == str(ckpt)
    reference = stages.read_json(workdir / "teacher" / "teacher.json")
    assert info["top1"] == pytest.approx(reference["top1"])
    # Another file at the same path changes the key: the stage is no longer up to date.
    key = stages.stage_key(recipe, "teacher")
    torch.save({k: v * 0 for k, v in trained.state_dict().items()}, ckpt)
    assert stages.stage_key(recipe, "teacher") != key


def test_a_teacher_trained_here_is_evaluated_again_not_retrained_for_another_test_set(trained_workdir, tmp_path, caplog):
    """`-S data.test_images=2000` (or another evaluation batch size) changes how the teacher is
    scored, not how it is trained: the stage re-evaluates the teacher it trained."""
    import shutil

    work = shutil.copytree(trained_workdir, tmp_path / "w")
    before = (work / "teacher" / "teacher.mpk").read_bytes()
    quick = tiny_recipe(work, data={"test_images": 300, "batch_size": 100})
    assert stages.stage_key(quick, "teacher") != stages.stage_key(tiny_recipe(work), "teacher")
    with caplog.at_level("INFO", logger="modelpress"):
        stages.teacher(quick)
    assert "trained before with these settings" in caplog.text and "teacher: training" not in caplog.text
    assert (work / "teacher" / "teacher.mpk").read_bytes() == before
    info = stages.read_json(work / "teacher" / "teacher.json")
    assert info["trained"] is True and stages.is_current(quick, "teacher")
    assert "on 300 test images" in caplog.text
    # teacher.mpk no longer the file teacher.json describes (a run with other training settings,
    # killed after rewriting it): not taken for the teacher these settings trained.
    other = tmp_path / "other.mpk"
    model, _ = load_packed(work / "teacher" / "teacher.mpk")
    with torch.no_grad():
        for q in model.parameters():
            q.mul_(0.5)
    from modelpress.pack import pack_model, read_packed

    pack_model(model, other, read_packed(work / "teacher" / "teacher.mpk").arch, {}, float_dtype="f32")
    shutil.copy(other, work / "teacher" / "teacher.mpk")
    caplog.clear()
    with caplog.at_level("INFO", logger="modelpress"):
        stages.teacher(tiny_recipe(work, data={"test_images": 200}))
    assert "teacher: training" in caplog.text
    assert (work / "teacher" / "teacher.mpk").read_bytes() == before  # trained again: the same teacher (same seed)


def test_unsafe_or_mismatched_weights_are_refused(workdir, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": NotWeights()}, evil)
    recipe = tiny_recipe(workdir, teacher={"weights": str(evil)})
    with pytest.raises(stages.StageError, match="weights_only=True"):
        stages.teacher(recipe)
    wrong = tiny_recipe(workdir, teacher={"weights": str(evil), "weights_sha256": "ab" * 32})
    with pytest.raises(stages.StageError, match="sha256 does not match"):
        stages.teacher(wrong)
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(stages.StageError, match="do not fit"):
        stages.teacher(tiny_recipe(workdir, teacher={"weights": str(other)}))
    with pytest.raises(stages.StageError, match="no such file"):
        stages.teacher(tiny_recipe(workdir, teacher={"weights": str(tmp_path / "missing.pt")}))


def test_pretrained_cifar_resnet20_scores_as_published(tmp_path):
    """The project's CIFAR ResNet loads the published weights (weights_only=True) and scores
    their published 91.73 % on the 10,000 test images."""
    CIFAR, RESNET20 = shared_data("cifar10"), shared_data("cifar10-resnets", "resnet20-12fca82f.th")
    work = tmp_path / "w"
    (work / "datasets").mkdir(parents=True)
    os.symlink(CIFAR, work / "datasets" / "cifar10")
    recipe = tiny_recipe(work, data={"name": "cifar10", "sources": [str(CIFAR)], "files": {
        "cifar10-train.npz": sha256_file(CIFAR / "cifar10-train.npz"), "cifar10-test.npz": sha256_file(CIFAR / "cifar10-test.npz")}, "test_images": None},
        teacher={"arch": "cifar_resnet20", "weights": str(RESNET20)})
    stages.teacher(recipe)
    assert stages.read_json(stages.paths(recipe)["teacher_info"])["top1"] == pytest.approx(91.73, abs=0.01)
