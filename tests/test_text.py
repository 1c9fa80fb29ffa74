"""Text encoders end to end: a JSON Lines data set tokenized with the model folder's own
tokenizer, a teacher read from a local Hugging Face folder (hf:<folder>/), PQ distilled on hidden
states, quality as embedding cosine to the teacher, and a registered model that takes strings and
returns sentence embeddings, with the tokenizer carried in the model version."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from text_fixtures import write_encoder_folder, write_text_dataset

from modelpress.data import text
from modelpress.inputs import call
from modelpress.recipe import Recipe, RecipeError

from helpers import CONSUMER_PREAMBLE

pytest.importorskip("transformers")
pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return write_encoder_folder(tmp_path_factory.mktemp("enc") / "encoder")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_text_dataset(folder)


def _recipe(workdir: Path, encoder: Path, corpus: tuple[Path, dict], **sections) -> Recipe:
    raw = {"run": {"name": "text-pq", "workdir": str(workdir)},
           "data": {"name": "text-jsonl", "sources": [str(corpus[0])], "files": corpus[1], "max_tokens": 48, "batch_size": 32},
           "teacher": {"arch": f"hf:{encoder}/"},
           "method": {"name": "pq", "linear": {"block_size": 4, "k": 16}, "calibration_images": 32, "kmeans_iters": 5,
                      "layer_finetune_epochs": 0.2},
           "finetune": {"epochs": 1, "batch_size": 16}}
    for section, values in sections.items():
        if section == "method" and values.get("name", "pq") != "pq":
            raw["method"] = {}  # another method: the PQ settings do not apply
        raw.setdefault(section, {}).update(values)
    return Recipe.parse(raw)


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    cases = {
        '{"text": "fine"}\nnot json\n': "line 2: not JSON",
        '{"text": 3}\n': 'line 1: expected an object with a "text" string',
        '{"text": "a", "label": -1}\n': "line 1: \"label\" must be a non-negative integer",
        '{"text": "a", "label": 1}\n{"text": "b"}\n': "1 of 2 lines have a \"label\"",
        "\n\n": "no texts",
    }
    for content, message in cases.items():
        path.write_text(content)
        with pytest.raises(text.TextDataError, match=message) as e:
            text.read_jsonl(path)
        assert str(path) in str(e.value)
    path.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(text.TextDataError, match="not UTF-8"):
        text.read_jsonl(path)
    path.write_text('{"text": "one", "label": 2}\n\n{"text": "two", "label": 0}\n')
    assert text.read_jsonl(path) == (["one", "two"], [2, 0])


def test_tokenized_batches_are_padded_and_masked_as_the_texts_alone(encoder):
    """Each text's tokens and embedding are the same alone or padded in a batch with longer ones;
    truncation keeps max_tokens tokens."""
    tok = text.load_tokenizer(encoder)
    texts = ["A short one.", "A much longer sentence about compressing models into small files on disk."]
    batch = text.tokenize(tok, texts, max_tokens=64)
    alone = text.tokenize(tok, texts[:1], max_tokens=64)
    n = int(alone["attention_mask"].sum())
    assert batch["input_ids"].shape[1] > n and int(batch["attention_mask"][0].sum()) == n
    assert torch.equal(batch["input_ids"][0, :n], alone["input_ids"][0])
    assert (batch["input_ids"][0, n:] == tok.token_to_id("[PAD]")).all()
    assert text.tokenize(tok, texts, max_tokens=5)["input_ids"].shape == (2, 5)
    from modelpress.models import build_model

    model = build_model(f"hf:{encoder}/")
    with torch.no_grad():
        e_batch = text.sentence_embedding(call(model, batch), batch["attention_mask"])
        e_alone = text.sentence_embedding(call(model, alone), alone["attention_mask"])
    torch.testing.assert_close(e_batch[0], e_alone[0], rtol=1e-4, atol=1e-5)


def test_embedding_cosine_is_centred_on_the_teacher():
    """Embeddings that share a large common part: raw cosine hides the error, the centred one
    shows it; a perfect copy scores 100."""
    g = torch.Generator().manual_seed(0)
    common = torch.full((1, 16), 5.0)
    teacher = common + torch.randn(64, 16, generator=g)
    noisy = teacher + torch.randn(64, 16, generator=g)
    assert text.embedding_cosine(teacher, teacher) == pytest.approx(100.0, abs=1e-4)
    raw = float(torch.nn.functional.cosine_similarity(noisy, teacher).mean()) * 100
    assert raw > 95 > text.embedding_cosine(noisy, teacher) > 50


def test_recipe_checks_for_text(tmp_path, encoder, corpus):
    r = _recipe(tmp_path, encoder, corpus)
    assert r.registered_name() == "hf-encoder-pq"
    # A sweep of it registers under a name of the same kind (the folder path is not a name).
    from modelpress.sweep import SweepConfig

    sweep = SweepConfig.model_validate({"name": "front", "points": [{"name": "a", "set": {"method.linear.k": 16}}], "base": r})
    assert [p.registry.model_name for _, p in sweep.expand()] == ["hf-encoder-front"]
    with pytest.raises(RecipeError, match="text-jsonl needs teacher.arch hf:<folder>"):
        _recipe(tmp_path, encoder, corpus, teacher={"arch": "fmnist_cnn"})
    with pytest.raises(RecipeError, match="needs data.name text-jsonl"):
        Recipe.parse({"teacher": {"arch": f"hf:{encoder}/"}})
    with pytest.raises(RecipeError, match="carries its weights"):
        _recipe(tmp_path, encoder, corpus, teacher={"weights": "x.pt"})
    from modelpress import stages

    with pytest.raises(ValueError, match="finetune.loss kl compares logits.*cosine or mse"):
        stages.preflight(_recipe(tmp_path, encoder, corpus, finetune={"loss": "kl"}))
    with pytest.raises(ValueError, match="method.loss labels: a text encoder has no labels"):
        stages.preflight(_recipe(tmp_path, encoder, corpus, method={"name": "prune", "target_sparsity": 0.5, "epochs": 1,
                                                                    "lr": 0.01, "weight_decay": 0.0}))
    with pytest.raises(RecipeError, match="files does not list test.jsonl"):
        _recipe(tmp_path, encoder, corpus, data={"files": {"train.jsonl": "0" * 64}})
    # Left empty, the new fields change no key of image runs (they are not written).
    dump = Recipe().model_dump(mode="json")
    assert "max_tokens" not in dump["data"] and "loss" not in dump["finetune"]


def test_preflight_names_a_folder_without_its_tokenizer(tmp_path, encoder, corpus):
    import shutil

    from modelpress import stages

    bare = tmp_path / "bare"
    shutil.copytree(encoder, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(text.TextDataError, match="no tokenizer.json"):
        stages.preflight(_recipe(tmp_path, bare, corpus))
    shutil.copy(encoder / "tokenizer.json", bare)
    (bare / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        stages.preflight(_recipe(tmp_path, bare, corpus))


def test_teacher_key_follows_the_folder_content(tmp_path, encoder, corpus):
    """Replacing the folder's weights at the same path invalidates the teacher and what follows."""
    import shutil

    from modelpress.stages import stage_key

    folder = tmp_path / "enc"
    shutil.copytree(encoder, folder)
    r = _recipe(tmp_path, folder, corpus)
    before = stage_key(r, "teacher"), stage_key(r, "finetune")
    write_encoder_folder(folder, seed=1)
    after = stage_key(r, "teacher"), stage_key(r, "finetune")
    assert before[0] != after[0] and before[1] != after[1]


def test_stages_compress_a_text_encoder_and_the_file_gives_the_same_embeddings(tmp_path, encoder, corpus):
    """fetch -> teacher (from the folder, not trained) -> PQ with cosine distillation -> pack ->
    evaluate: every Linear layer quantized, the file several times smaller, the embeddings of the
    packed file (loaded in this process) those the evaluate stage scored."""
    from modelpress import stages
    from modelpress.pack import load_packed

    r = _recipe(tmp_path / "w", encoder, corpus)
    stages.preflight(r)
    stages.fetch(r)
    stages.teacher(r)
    info = stages.read_teacher(r)
    assert info.source == str(encoder) and not info.trained and info.top1 == pytest.approx(100.0, abs=1e-3)
    assert stages.tokenizer_file(r).read_bytes() == (encoder / "tokenizer.json").read_bytes()
    stages.compress_stage(r)
    stages.finetune_stage(r)
    packed = stages.pack_stage(r)
    ev = stages.evaluate_file(packed, r)
    summary = stages.summarize(r, ev)
    assert summary["metric"] == "embedding_cosine" and summary["layers_quantized"] == 13  # 2 x 6 Linear + pooler
    assert 50 < summary["compressed_top1"] < 100 and summary["compression_ratio"] > 3
    model, meta = load_packed(packed)
    assert meta["input"] == {"dataset": "text-jsonl", "kind": "tokens", "max_tokens": 48, "embedding": "mean"}
    teacher, _ = load_packed(stages.paths(r)["teacher"])
    _, test = text.load_text(stages.paths(r)["data"], text.load_tokenizer(encoder), 48)
    batches = torch.utils.data.DataLoader(test, batch_size=32)
    got = text.embedding_cosine(text.embeddings(model, batches), text.embeddings(teacher, batches))
    assert got == pytest.approx(ev["top1"], abs=1e-4)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return write_encoder_folder(tmp_path_factory.mktemp("cls") / "classifier", classes=2)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("labelled")
    return folder, write_text_dataset(folder, labelled=True)


def test_a_sequence_classifier_is_scored_by_top1_on_the_labels(tmp_path, classifier, labelled, corpus):
    """A *ForSequenceClassification folder on labelled texts: KL on its logits, top-1 on the labels
    (the teacher's is measured, not 100), the file records its classes; without labels in the data
    set the teacher stage says why it cannot score it."""
    from modelpress import stages
    from modelpress.pack import load_packed

    r = _recipe(tmp_path / "w", classifier, labelled)
    stages.preflight(r)
    stages.fetch(r)
    stages.teacher(r)
    info = stages.read_teacher(r)
    assert info.num_classes == 2 and 0 < info.top1 < 100
    stages.compress_stage(r)
    stages.finetune_stage(r)
    ev = stages.evaluate_file(stages.pack_stage(r), r)
    summary = stages.summarize(r, ev)
    assert "metric" not in summary and 0 <= summary["compressed_top1"] <= 100  # top-1, as for images
    _, meta = load_packed(stages.paths(r)["packed"])
    assert meta["input"]["classes"] == 2 and "embedding" not in meta["input"]
    unlabelled = _recipe(tmp_path / "w2", classifier, corpus)
    stages.fetch(unlabelled)
    with pytest.raises(stages.StageError, match="test.jsonl has no \"label\".*sequence classifier \\(2 classes\\)"):
        stages.teacher(unlabelled)


CONSUMER = CONSUMER_PREAMBLE + r"""import json
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(json.loads(sys.argv[2])))
"""


@pytest.mark.pipeline
@pytest.mark.parametrize("kind", ["encoder", "classifier"])
def test_registered_text_model_takes_strings(prefect_server, own_store, tmp_path, encoder, corpus, classifier, labelled, kind):
    """The flow registers the packed model with its tokenizer; a consumer process (no Prefect,
    no modelpress install) loads the version by alias and gives it strings: an encoder returns the
    same vectors as load_packed + the tokenizer + mean pooling, a classifier the same labels."""
    from modelpress import stages
    from modelpress.flows.compress import compress_flow
    from modelpress.pack import load_packed
    from modelpress.tasks import registry

    folder, data = (encoder, corpus) if kind == "encoder" else (classifier, labelled)
    name = f"text-{kind}-pq"
    r = _recipe(tmp_path / "w", folder, data, registry={"model_name": name, "max_top1_drop": 100})
    summary = compress_flow(r)
    mv = registry.client().get_model_version(name, summary["registered"]["version"])
    assert mv.tags["modelpress.teacher_arch"] == f"hf:{folder}/"
    assert mv.tags["modelpress.metric"] == ("embedding_cosine" if kind == "encoder" else "top1")
    assert ("sentence embeddings" if kind == "encoder" else "the class of each text") in mv.description
    assert "tokenizer.json" in mv.description

    sentences = ["Compression keeps the accuracy.", "A registry consumer loads the champion.", "Short."]
    proc = subprocess.run([sys.executable, "-c", CONSUMER, f"models:/{name}@candidate", json.dumps(sentences),
                           tmp_path / "out.npy"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "out.npy")
    model, _ = load_packed(stages.paths(r)["packed"])
    x = text.tokenize(text.load_tokenizer(folder), sentences, 48)
    with torch.no_grad():
        out = model(**x)
    if kind == "encoder":
        assert got.shape == (3, 32)
        np.testing.assert_allclose(got, text.sentence_embedding(out, x["attention_mask"]).numpy(), rtol=1e-5, atol=1e-6)
    else:
        assert got.shape == (3,) and got.dtype == np.int64
        np.testing.assert_array_equal(got, out["logits"].argmax(-1).numpy())


TEXT_METHODS = {
    "pq": {"linear": {"block_size": 4, "k": 16}, "kmeans_iters": 3},
    "prune": {"target_sparsity": 0.5, "epochs": 0.2, "lr": 0.001, "weight_decay": 0.0, "batch_size": 16, "loss": "distill"},
    "prune_pq": {"prune": {"target_sparsity": 0.5, "epochs": 0.2, "lr": 0.001, "weight_decay": 0.0, "batch_size": 16,
                           "loss": "distill"}},
    "kmeans": {},
    "uniform": {},
    "wfn": {"epochs_per_iteration": 0.2, "fractions": [0.5, 1.0]},
    "lc": {"lc_steps": 2, "l_step_epochs": 0.2},
}


@pytest.mark.parametrize("method", sorted(TEXT_METHODS))
def test_every_method_compresses_a_text_encoder_on_token_batches(tmp_path, encoder, corpus, method):
    """Each registered method compresses the encoder from padded token batches (dict inputs),
    its own retraining distilling the hidden states (cosine); the packed file rebuilds by class and
    configuration to the same outputs."""
    from modelpress import compress
    from modelpress.methods import REGISTRY
    from modelpress.models import build_model
    from modelpress.models.hf import folder_arch
    from modelpress.pack import load_packed, pack_model
    from modelpress.train import loader

    assert set(REGISTRY) <= set(TEXT_METHODS), "a new method: add it here"
    torch.manual_seed(0)
    model = build_model(f"hf:{encoder}/")
    train, test = text.load_text(corpus[0], text.load_tokenizer(encoder), 32)
    calibration = next(iter(loader(train, 32, False)))[0]
    config = REGISTRY[method].config(**TEXT_METHODS[method])
    student, _ = compress(copy.deepcopy(model), config, calibration=calibration, teacher=model,
                          train_batches=loader(train, 16, True), loss=text.hidden_state_loss("cosine"))
    path = tmp_path / "encoder.mpk"
    pack_model(student, path, folder_arch(encoder), float_dtype="f32", codebook_dtype="f32")
    loaded, _ = load_packed(path)
    x = next(iter(loader(test, 8, False)))[0]
    with torch.no_grad():
        torch.testing.assert_close(text.last_hidden(call(loaded, x)), text.last_hidden(call(student.eval(), x)),
                                   atol=1e-5, rtol=1e-5)
        cosine = text.embedding_cosine(text.embeddings(student, loader(test, 32, False)),
                                       text.embeddings(model, loader(test, 32, False)))
    assert 0 < cosine < 100


def test_a_budget_with_per_layer_codebook_storage_through_the_stages(tmp_path, encoder, corpus):
    """budget_codebooks in a run: the allocation names each layer's storage, fine-tuning trains
    against it, and the packed file stores each layer's codebook as allocated, within the budget."""
    from modelpress import stages
    from modelpress.pack import read_packed

    method = {"target_bytes": 12_000, "budget_scope": "layers", "budget_k": [16, 64], "budget_codebooks": ["i6", "g8"],
              "budget_linear_blocks": [4], "budget_images": 16, "layer_finetune_epochs": 0}
    r = _recipe(tmp_path / "w", encoder, corpus, method=method, pack={"codebook_dtype": "i6"})
    stages.fetch(r)
    stages.teacher(r)
    stages.compress_stage(r)
    stages.finetune_stage(r)
    packed = read_packed(stages.pack_stage(r))
    rows = stages.read_json(stages.paths(r)["allocation"])["layers"]
    planned = {f"{row['layer']}.weight": row["codebook"] for row in rows if row["k"]}
    stored = {name: p["cb"] for name, enc, p, _ in packed.entries if enc == "pq"}
    assert stored == planned and set(planned.values()) <= {"i6", "g8"}
    assert sum(len(buf) for name, _, _, buf in packed.entries if name in stored) <= 12_000
