"""finetune.distill_from: the final fine-tuning distils from another model than the teacher being
compressed. It is really used, it is part of the fine-tuning's cache key (file content
included), and a missing or mismatched file fails with a message naming the setting."""

from __future__ import annotations

import hashlib

import pytest
import torch

from modelpress import stages
from modelpress.models import build_model

from helpers import tiny_recipe

pytestmark = pytest.mark.pipeline

# scalar k-means at 2 bits: a fast method whose fine-tuning moves the model a lot
METHOD = {"name": "kmeans", "bits": 2}
FINETUNE = {"epochs": 0.1, "lr": 0.005, "bn_batches": 5}


def _top1(recipe) -> float:
    stages.compress_stage(recipe)
    stages.finetune_stage(recipe)
    return stages.evaluate_file(stages.pack_stage(recipe), recipe)["top1"]


def test_distilling_from_another_model_uses_it(workdir, tmp_path):
    torch.manual_seed(123)
    random_model = tmp_path / "random.pt"  # an untrained fmnist_cnn: its outputs carry no knowledge
    torch.save(build_model("fmnist_cnn", num_classes=10, in_channels=1).state_dict(), random_model)

    own = tiny_recipe(workdir, method=METHOD, finetune=FINETUNE)
    top1_own = _top1(own)
    other = tiny_recipe(workdir, method=METHOD, finetune={**FINETUNE, "distill_from": {
        "arch": "fmnist_cnn", "weights": str(random_model),
        "weights_sha256": hashlib.sha256(random_model.read_bytes()).hexdigest()}})
    stages.preflight(other)
    assert stages.stage_key(other, "finetune") != stages.stage_key(own, "finetune")
    top1_other = _top1(other)
    assert top1_other < top1_own - 10, (top1_own, top1_other)  # it imitated the untrained model

    key = stages.stage_key(other, "finetune")
    torch.manual_seed(7)
    torch.save(build_model("fmnist_cnn", num_classes=10, in_channels=1).state_dict(), random_model)
    unpinned = tiny_recipe(workdir, method=METHOD, finetune={**FINETUNE, "distill_from": {
        "arch": "fmnist_cnn", "weights": str(random_model)}})
    other_unpinned_key = stages.stage_key(unpinned, "finetune")
    assert other_unpinned_key != key  # the file's content is in the key, not only its path
    with pytest.raises(stages.StageError, match="finetune.distill_from weights .*sha256 does not match "
                                                "finetune.distill_from.weights_sha256"):
        stages.finetune_stage(other)  # the pinned sha256 no longer matches the file


def test_missing_distill_file_fails_in_preflight(tmp_path):
    recipe = tiny_recipe(tmp_path / "w", finetune={"distill_from": {"arch": "fmnist_cnn", "weights": str(tmp_path / "nope.pt")}})
    with pytest.raises(ValueError, match=r"finetune.distill_from.weights .*nope.pt: no such file"):
        stages.preflight(recipe)
    recipe = tiny_recipe(tmp_path / "w", finetune={"distill_from": {"arch": "no_such_arch", "weights": str(tmp_path)}})
    with pytest.raises(ValueError, match="no_such_arch"):
        stages.preflight(recipe)
    # A file that is there but wrong fails up front too, not after the compression.
    resnet = tmp_path / "resnet20.pt"
    torch.save(build_model("cifar_resnet20").state_dict(), resnet)
    recipe = tiny_recipe(tmp_path / "w", finetune={"distill_from": {"arch": "fmnist_cnn", "weights": str(resnet)}})
    with pytest.raises(stages.StageError, match=r"finetune.distill_from weights .*resnet20.pt"):
        stages.preflight(recipe)
    recipe = tiny_recipe(tmp_path / "w", finetune={"distill_from": {"arch": "fmnist_cnn", "weights": str(resnet), "weights_sha256": "0" * 64}})
    with pytest.raises(stages.StageError, match="sha256 does not match finetune.distill_from.weights_sha256"):
        stages.preflight(recipe)
    vit = tmp_path / "vit.pt"  # its weights fit, but it takes 32x32 images
    torch.save(build_model("cifar_vit", num_classes=10, in_channels=1).state_dict(), vit)
    recipe = tiny_recipe(tmp_path / "w", finetune={"distill_from": {"arch": "cifar_vit", "weights": str(vit)}})
    with pytest.raises(ValueError, match=r"finetune.distill_from.arch cifar_vit does not take fashion-mnist's inputs"):
        stages.preflight(recipe)


def test_registry_lineage_names_the_model_distilled_from(tmp_path):
    from modelpress.tasks.register import version_tags

    weights = tmp_path / "bigger.pt"
    torch.save(build_model("fmnist_cnn", num_classes=10, in_channels=1).state_dict(), weights)
    summary = {"packed_bytes": 1, "compression_ratio": 2.0, "teacher_top1": 90.0, "compressed_top1": 89.0,
               "top1_drop": 1.0, "packed_sha256": "0" * 64}
    plain = version_tags(tiny_recipe(tmp_path / "w"), summary)
    assert not any("distilled_from" in k for k in plain)
    tags = version_tags(tiny_recipe(tmp_path / "w", finetune={"distill_from": {"arch": "fmnist_cnn", "weights": str(weights)}}), summary)
    assert tags["modelpress.distilled_from"] == f"fmnist_cnn:{weights}"
    assert tags["modelpress.distilled_from_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
