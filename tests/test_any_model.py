"""Models beyond the project's CNNs: a vision transformer (attention through
nn.MultiheadAttention, whose in-projection is a bare Parameter), a text encoder fed a dict of
input_ids and attention_mask, and a model of the user's own class; product quantization,
distillation with a loss that fits the output, and the packed file, on each."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from modelpress.methods.pq import BlockSpec, PQAttention, PQConfig, PQLayer, plan, quantize_pq
from modelpress.methods.pq.quantize import input_gram

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _small_vit():
    from modelpress.models import build_model

    kwargs = dict(num_classes=10, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)
    model = build_model("cifar_vit", **kwargs).eval()
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts it at zero: no gradient would reach the rest
    return model, kwargs


def test_vit_attention_in_projections_are_quantized_and_pack_and_load_exactly(tmp_path):
    """A vision transformer (torchvision's VisionTransformer, attention through
    nn.MultiheadAttention): every weight matrix is quantized, the attention's packed
    in-projection (in_proj_weight, a bare Parameter) included; the file, rebuilt by architecture
    name, gives the compressed model's outputs exactly, as plain layers or with the codebooks."""
    from modelpress.pack import arch_spec, load_packed, pack_model

    torch.manual_seed(0)
    model, kwargs = _small_vit()
    attentions = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    matrices = attentions | {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert len(attentions) == 2 and len(matrices) == 2 + 2 * 3 + 2  # per block: attention, out_proj, 2 MLP; patches, head
    cfg = PQConfig(kmeans_iters=2, layer_finetune_epochs=0, linear=BlockSpec(block_size=4, k=16),
                   conv=BlockSpec(block_size=16, k=16), exclude=["heads.*"])
    planned = dict(plan(model, cfg))
    assert set(planned) == matrices - {"heads.head"}
    images = torch.randn(32, 3, 32, 32)
    student, stats = quantize_pq(copy.deepcopy(model), cfg, images, teacher=model)
    for name in attentions:
        pq = student.get_submodule(name)
        assert isinstance(pq, PQAttention) and "in_proj_weight" not in dict(pq.named_parameters())
        assert pq.codes.numel() == 3 * 64 * 64 // 4
        row = next(s for s in stats if s["layer"] == name)
        assert row["weights"] == 3 * 64 * 64 and 0 < row["output_rel_error"] < 1
    # the decoded in-projections, put into the original attentions, give the same outputs
    decoded = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in student.named_modules():
            if isinstance(m, (PQLayer, PQAttention)):
                getattr(decoded.get_submodule(name), "in_proj_weight" if name in attentions else "weight").copy_(m.weight)
        assert torch.allclose(student(images), decoded(images), atol=1e-5, rtol=1e-5)

    path = tmp_path / "vit.mpk"
    size = pack_model(student, path, arch_spec("cifar_vit", **kwargs), codebook_dtype="f32", float_dtype="f32")
    assert size == path.stat().st_size
    plain, _ = load_packed(path)
    coded, _ = load_packed(path, materialize=False)
    assert all(type(plain.get_submodule(n)) is nn.MultiheadAttention for n in attentions)
    assert all(isinstance(coded.get_submodule(n), PQAttention) for n in attentions)
    with torch.no_grad():
        expected = student.eval()(images)
        assert torch.equal(plain(images), expected) and torch.equal(coded(images), expected)
    # the codebooks of the rebuilt attentions train (distillation after loading a checkpoint)
    coded.train()
    coded(images[:4]).sum().backward()
    assert all(coded.get_submodule(n).codebook.grad.abs().sum() > 0 for n in attentions)


def test_attention_gram_sums_query_key_and_value_inputs():
    """The rows of an in-projection multiply the query (self-attention: one input) or, in
    cross-attention, the query, key and value: the Gram holds each distinct input once."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    q, kv = torch.randn(3, 5, 8), torch.randn(3, 7, 8)

    class Cross(nn.Module):
        def __init__(self, same: bool):
            super().__init__()
            self.attention, self.same = attention, same

        def forward(self, x):
            if self.same:
                return self.attention(x, x, x)[0]
            return self.attention(query=x, key=kv, value=kv, need_weights=False)[0]  # keywords: seen too

    def gram(x):
        rows = x.reshape(-1, 4).double()
        return rows.T @ rows

    assert torch.allclose(input_gram(Cross(True), attention, q, 4), gram(q))
    assert torch.allclose(input_gram(Cross(False), attention, q, 4), gram(q) + gram(kv))


def test_vit_byte_budget_allocates_attention_in_projections():
    """A byte budget chooses settings for the in-projections like any layer: the plan names them."""
    from modelpress.methods.pq.budget import plan_budget

    torch.manual_seed(0)
    model, _ = _small_vit()
    dense = sum(p.numel() for p in model.parameters()) * 2
    cfg = PQConfig(kmeans_iters=2, budget_k=[16, 64], budget_images=16, target_bytes=dense // 3)
    planned, rows = plan_budget(model, cfg, torch.randn(16, 3, 32, 32))
    layers = {r["layer"]: r for r in rows}
    assert {"encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention"} <= set(layers)
    assert any(r["k"] for n, r in layers.items() if n.endswith("self_attention"))
    assert sum(r["bytes"] for r in rows) <= cfg.target_bytes


class _TokenEncoder(nn.Module):
    """A small text encoder with keyword inputs: token embeddings, two nn.TransformerEncoder
    layers (attention through nn.MultiheadAttention), mean pooling over the real tokens."""

    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        block = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 4)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(self.embed(input_ids), src_key_padding_mask=~attention_mask.bool())
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def test_dict_inputs_with_padding_masks_give_the_gram_of_the_real_tokens_alone():
    """Calibration inputs as a dict (input_ids, attention_mask): the Gram of a layer inside the
    encoder is that of the real tokens only, equal to the Gram measured on the same sentences
    fed one by one without padding; the whole encoder then quantizes through them, its
    attentions' in-projections included (the fused inference path of nn.TransformerEncoderLayer
    is off while measuring, or no layer inside would be seen)."""
    torch.manual_seed(0)
    model = _TokenEncoder().eval()
    lengths = [3, 7, 5, 8]
    ids = torch.randint(1, 50, (len(lengths), 8))
    mask = (torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask  # padding token 0 after each sentence
    batch = {"input_ids": ids, "attention_mask": mask}
    for name in ("encoder.layers.0.self_attn", "encoder.layers.1.linear1", "head"):
        layer = model.get_submodule(name)
        padded = input_gram(model, layer, batch, 4)
        alone = sum(input_gram(model, layer, {"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]}, 4)
                    for i, n in enumerate(lengths))
        assert torch.allclose(padded, alone, rtol=1e-4, atol=1e-6), name  # (float32 attention: last digits)
    everything = input_gram(model, model.get_submodule("encoder.layers.1.linear1"), (ids, mask), 4)  # no mask seen
    assert not torch.allclose(everything, input_gram(model, model.get_submodule("encoder.layers.1.linear1"), batch, 4))


    cfg = PQConfig(kmeans_iters=2, layer_finetune_epochs=0, linear=BlockSpec(block_size=4, k=8))
    student, stats = quantize_pq(copy.deepcopy(model), cfg, batch, teacher=model)
    assert all(isinstance(student.get_submodule(f"encoder.layers.{i}.self_attn"), PQAttention) for i in range(2))
    assert all(0 < s["output_rel_error"] < 1 for s in stats)
    with torch.no_grad():
        assert student(**batch).shape == (4, 4)


class _Sentences(torch.utils.data.Dataset):
    """(inputs, label) pairs whose inputs are a dict of padded token ids and their mask."""

    def __init__(self, n: int, length: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, length), generator=g)
        lengths = torch.randint(2, length + 1, (n,), generator=g)
        self.mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        self.ids *= self.mask

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, 0


class _Embedder(_TokenEncoder):
    """The encoder as a sentence embedder (its output: the pooled vector, no classifier), with
    dropout, which the distillation must keep off."""

    def __init__(self):
        super().__init__()
        self.head = nn.Identity()
        self.drop = nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask):
        return self.drop(super().forward(input_ids, attention_mask))


def test_compress_distils_an_embedder_with_the_cosine_loss_and_dropout_off():
    """compress() runs the final distillation itself when asked, with a loss that fits the output
    (cosine on embeddings): the compressed embedder moves toward the teacher's embeddings on
    held-out sentences; an unknown loss is refused before any work; dropout stays off."""
    from modelpress import compress
    from modelpress.train import distill_loss, loader

    torch.manual_seed(0)
    teacher = _Embedder().eval()
    train, held_out = _Sentences(256, seed=1), _Sentences(64, seed=2)
    held = {"input_ids": held_out.ids, "attention_mask": held_out.mask}
    calibration = {"input_ids": train.ids[:64], "attention_mask": train.mask[:64]}
    cfg = PQConfig(kmeans_iters=4, layer_finetune_epochs=0, linear=BlockSpec(block_size=4, k=4))

    def cosine_gap(model):
        with torch.no_grad():
            return float(distill_loss(model.eval()(**held), teacher(**held), kind="cosine"))

    with pytest.raises(ValueError, match="unknown distillation loss 'cos'"):
        compress(copy.deepcopy(teacher), cfg, calibration=calibration, teacher=teacher,
                 train_batches=loader(train, 32, True), finetune_epochs=1, loss="cos")
    plain, _ = compress(copy.deepcopy(teacher), cfg, calibration=calibration, teacher=teacher)
    before = cosine_gap(plain)
    seen = []
    student = copy.deepcopy(teacher)
    student.drop.register_forward_hook(lambda m, _i, _o: seen.append(m.training) if torch.is_grad_enabled() else None)
    tuned, _ = compress(student, cfg, calibration=calibration, teacher=teacher, train_batches=loader(train, 32, True),
                        finetune_epochs=3, finetune_lr=3e-3, loss="cosine")
    assert seen and not any(seen), "dropout was on during the distillation"  # (seen: the passes with gradients)
    after = cosine_gap(tuned)
    assert 0 < after < 0.8 * before, (before, after)


@pytest.fixture
def offline(monkeypatch):
    """No connection leaves this process: building, saving and loading a Hugging Face model must
    not download anything."""
    import socket

    def refuse(self, address, *args):
        raise AssertionError(f"a network connection was attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _tiny_bert_folder(tmp_path):
    """A BERT-style encoder built offline from a configuration (random weights), saved as a
    Hugging Face folder: config.json and model.safetensors."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    folder = tmp_path / "bert"
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def test_hugging_face_encoder_by_reference_compresses_packs_and_loads_exactly(tmp_path, offline):
    """A BERT-style encoder from a local folder (config.json + model.safetensors, no download):
    product quantization on padded token batches, a packed file that names the class and carries
    the configuration, rebuilt offline with the same outputs; a class off the allow-list is
    refused at pack time and in a file."""
    import json

    from modelpress.models.hf import hf_arch, load_hf_folder
    from modelpress.pack import PackedFormatError, load_packed, pack_model, read_packed

    model = load_hf_folder(_tiny_bert_folder(tmp_path))
    assert type(model).__name__ == "BertModel"
    ids = torch.randint(1, 100, (16, 12))
    mask = (torch.arange(12)[None, :] < torch.randint(3, 13, (16, 1))).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    cfg = PQConfig(kmeans_iters=2, layer_finetune_epochs=0, linear=BlockSpec(block_size=4, k=16))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(dict(plan(model, cfg))) == linears  # query, key, value, output, intermediate, output.dense, pooler
    student, _ = quantize_pq(copy.deepcopy(model), cfg, batch, teacher=model)
    assert all(isinstance(student.get_submodule(n), PQLayer) for n in linears)

    path = tmp_path / "bert.mpk"
    arch = hf_arch(student)
    assert arch["name"] == "hf:BertModel" and json.loads(arch["kwargs"]["config"])["hidden_size"] == 32
    size = pack_model(student, path, arch, float_dtype="f32", codebook_dtype="f32")
    assert size == path.stat().st_size
    loaded, _ = load_packed(path)
    with torch.no_grad():
        expected = student(**batch).last_hidden_state
        assert torch.equal(loaded(**batch).last_hidden_state, expected)

    transformers = pytest.importorskip("transformers")
    masked_lm = transformers.BertForMaskedLM(model.config)
    with pytest.raises(ValueError, match="'BertForMaskedLM' is not on the allow-list"):
        hf_arch(masked_lm)
    packed = read_packed(path)
    packed.arch = {"name": "hf:BertForMaskedLM", "kwargs": packed.arch["kwargs"]}
    from modelpress.pack.model import build_from_packed

    with pytest.raises(PackedFormatError, match="not on the allow-list"):
        build_from_packed(packed)
    remote = {**json.loads(arch["kwargs"]["config"]), "auto_map": {"AutoModel": "evil.Model"}}
    packed.arch = {"name": "hf:BertModel", "kwargs": {"config": json.dumps(remote)}}
    with pytest.raises(PackedFormatError, match="remote code"):
        build_from_packed(packed)


METHOD_SETTINGS = {
    "pq": {"overrides": {"conv_proj": {"block_size": 4, "k": 16}}},  # 4x4 patches: rows of 48
    "prune": {"target_sparsity": 0.5, "epochs": 0.1, "lr": 0.01, "weight_decay": 0.0, "batch_size": 16},
    "prune_pq": {"prune": {"target_sparsity": 0.5, "epochs": 0.1, "lr": 0.01, "weight_decay": 0.0, "batch_size": 16}},
    "kmeans": {},
    "uniform": {},
    "wfn": {"epochs_per_iteration": 0.1, "fractions": [0.5, 1.0]},
    "lc": {"lc_steps": 2, "l_step_epochs": 0.1},
    "lc-lowrank": {"lc_steps": 2, "l_step_epochs": 0.1,
                   "tasks": [{"layers": ["*out_proj", "*mlp.*"], "scheme": "lowrank", "rank": 8}]},
}


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_every_method_compresses_a_vision_transformer_and_its_file_loads(tmp_path, method):
    """Each registered method (and LC's low rank on the attention's out_proj, which the attention
    reads as a weight rather than calls) compresses the ViT; the packed file rebuilds by name to
    the same outputs."""
    from torch.utils.data import TensorDataset

    from modelpress import compress
    from modelpress.methods import REGISTRY
    from modelpress.pack import arch_spec, load_packed, pack_model
    from modelpress.train import loader

    assert set(REGISTRY) <= set(METHOD_SETTINGS), "a new method: add it here"
    torch.manual_seed(0)
    model, kwargs = _small_vit()
    images, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    config = REGISTRY[method.split("-")[0]].config(**METHOD_SETTINGS[method])
    student, _ = compress(copy.deepcopy(model), config, calibration=images, teacher=model,
                          train_batches=loader(TensorDataset(images, labels), 16, True))
    path = tmp_path / "vit.mpk"
    pack_model(student, path, arch_spec("cifar_vit", **kwargs), float_dtype="f32", codebook_dtype="f32")
    loaded, _ = load_packed(path)
    with torch.no_grad():
        assert torch.allclose(loaded(images[:8]), student.eval()(images[:8]), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_layers_are_quantized_and_their_entries_keep_the_stored_layout(tmp_path, offline):
    """Hugging Face Conv1D (GPT-2: ``x @ weight + bias``, weight stored (in, out)) is product
    quantized as the Linear it is, rows of its transpose; the packed entry keeps the stored
    (in, out) shape, marked transposed, so that the file rebuilds GPT-2 by reference and gives the
    compressed model's outputs exactly, with plain or quantized layers."""
    transformers = pytest.importorskip("transformers")
    from modelpress.models.hf import hf_arch
    from modelpress.pack import load_packed, pack_model, read_packed

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    model = transformers.GPT2Model(config).eval()
    conv1d = {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(conv1d) == 2 * 4  # per block: c_attn, attn.c_proj, c_fc, mlp.c_proj
    ids = torch.randint(1, 100, (8, 12))
    mask = (torch.arange(12)[None, :] < torch.randint(3, 13, (8, 1))).long()
    batch = {"input_ids": ids, "attention_mask": mask}
    cfg = PQConfig(kmeans_iters=2, layer_finetune_epochs=0, linear=BlockSpec(block_size=4, k=16))
    assert set(dict(plan(model, cfg))) == set(conv1d)
    student, _ = quantize_pq(copy.deepcopy(model), cfg, batch, teacher=model)
    for name, layer in conv1d.items():
        pq = student.get_submodule(name)
        assert isinstance(pq, PQLayer) and pq.weight_shape == tuple(layer.weight.T.shape)
    path = tmp_path / "gpt2.mpk"
    pack_model(student, path, hf_arch(student), float_dtype="f32", codebook_dtype="f32")
    entries = {name: p for name, _, p, _ in read_packed(path).entries}
    for name, layer in conv1d.items():
        assert entries[f"{name}.weight"]["shape"] == list(layer.weight.shape) and entries[f"{name}.weight"]["t"] == 1
    plain, _ = load_packed(path)
    coded, _ = load_packed(path, materialize=False)
    with torch.no_grad():
        expected = student(**batch).last_hidden_state
        assert torch.equal(plain(**batch).last_hidden_state, expected)
        assert torch.equal(coded(**batch).last_hidden_state, expected)
    assert type(plain.get_submodule(next(iter(conv1d)))).__name__ == "Conv1D"


def test_one_metric_per_block_position_keeps_outlier_input_channels_in_weight():
    """Input channels with outlier activations (as transformers have): one Gram shared by every
    block position averages them away; one Gram per position (method.metric: position) keeps
    them, and the layer's output error ||X(W - W_hat)||^2, measured on the calibration inputs and
    on held-out ones, is lower at the same k and block (about half here)."""
    torch.manual_seed(0)

    def inputs(n):
        x = torch.randn(n, 64)
        x[:, [5, 37]] *= 30.0  # two outlier channels
        return x

    layer = nn.Linear(64, 96)
    calibration, held_out = inputs(512), inputs(512)

    def error(metric, x):
        cfg = PQConfig(kmeans_iters=20, layer_finetune_epochs=0, linear=BlockSpec(block_size=4, k=32), metric=metric)
        student, stats = quantize_pq(copy.deepcopy(nn.Sequential(layer)), cfg, calibration)
        w, w_hat = layer.weight.detach(), student[0].weight.detach()
        return float(((x @ (w - w_hat).T) ** 2).sum() / ((x @ w.T) ** 2).sum()), stats[0]

    for x in (calibration, held_out):
        shared, _ = error(None, x)
        position, stats = error("position", x)
        assert position < shared / 1.5, (shared, position)
    assert abs(stats["output_rel_error"] - error("position", calibration)[0]) < 1e-4  # the stat measures the same


def test_byte_budget_on_a_hugging_face_encoder_with_padded_token_batches(tmp_path, offline):
    """The byte budget measures each candidate's damage on the encoder's own output (its hidden
    states, not logits) through dict inputs, and its plan fits the budget."""
    from modelpress.methods.pq.budget import plan_budget
    from modelpress.models.hf import hf_arch, load_hf_folder

    model = load_hf_folder(_tiny_bert_folder(tmp_path))
    ids = torch.randint(1, 100, (16, 12))
    mask = (torch.arange(12)[None, :] < torch.randint(3, 13, (16, 1))).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    dense = sum(p.numel() for p in model.parameters()) * 2
    cfg = PQConfig(kmeans_iters=2, budget_k=[16, 64], budget_images=16, target_bytes=int(dense * 0.6))
    planned, rows = plan_budget(model, cfg, batch, arch=hf_arch(model))
    assert {r["layer"] for r in rows} == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert all(r["kl_alone"] >= 0 for r in rows) and any(r["k"] for r in rows), [r["kl_alone"] for r in rows]
    student, _ = quantize_pq(copy.deepcopy(model), planned.model_copy(update={"layer_finetune_epochs": 0}), batch, teacher=model)
    from modelpress.pack import pack_model

    assert pack_model(student, tmp_path / "bert.mpk", hf_arch(model)) <= cfg.target_bytes


def test_a_budget_over_the_allocated_layers_alone_with_block_size_two(tmp_path, offline):
    """A transformer whose embeddings stay fp16: a file-wide budget of 8x its Linear weights'
    fp16 bytes cannot be met (the embeddings alone are larger); the same budget over the allocated
    layers' weights alone (budget_scope: layers) is met, counted on the packed entries, with
    block size 2 among the Linear candidates (budget_linear_blocks). Left empty, the new fields
    change no key of earlier work."""
    from modelpress.methods.pq.budget import BudgetError, allocated_nbytes, check_reachable, measure_key, plan_budget
    from modelpress.models.hf import hf_arch, load_hf_folder

    model = load_hf_folder(_tiny_bert_folder(tmp_path))
    ids = torch.randint(1, 100, (16, 12))
    mask = (torch.arange(12)[None, :] < torch.randint(3, 13, (16, 1))).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    linear_bytes = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    target = linear_bytes // 8
    file_wide = PQConfig(kmeans_iters=2, budget_k=[4, 16, 64], budget_images=16, target_bytes=target)
    with pytest.raises(BudgetError, match="cannot be met"):
        check_reachable(model, file_wide, arch=hf_arch(model))
    cfg = file_wide.model_copy(update={"budget_scope": "layers", "budget_linear_blocks": [2, 4, 8, 16]})
    check_reachable(model, cfg, arch=hf_arch(model))
    planned, rows = plan_budget(model, cfg, batch, arch=hf_arch(model))
    assert sum(r["bytes"] for r in rows) <= target
    student, _ = quantize_pq(copy.deepcopy(model), planned.model_copy(update={"layer_finetune_epochs": 0}), batch, teacher=model)
    assert allocated_nbytes(student, []) <= target < linear_bytes

    from modelpress.methods.pq.budget import measure
    table = measure(model, cfg.model_copy(update={"budget_k": [4]}), {k: v[:8] for k, v in batch.items()})
    assert any(r["spec"] is not None and r["spec"].block_size == 2 for rows_ in table.values() for r in rows_)
    assert "budget_linear_blocks" not in measure_key(file_wide) and "budget_linear_blocks" in measure_key(cfg)
    assert not {"budget_scope", "budget_linear_blocks", "metric"} & set(PQConfig().model_dump())


def test_kernels_of_other_sizes_get_one_kernel_row_per_block():
    """The conv default (block 9, one 3x3 kernel) does not divide a 7x7 stem's rows (3 x 49) nor
    a 4x4 patch embedding's (3 x 16): those get one kernel row per block instead of an error; an
    explicit override that does not divide is still refused."""
    from modelpress.models import build_model

    resnet = build_model("torchvision:resnet18", num_classes=10)
    planned = dict(plan(resnet, PQConfig()))
    assert planned["conv1"].block_size == 7 and planned["layer1.0.conv1"].block_size == 9
    vit, _ = _small_vit()
    assert dict(plan(vit, PQConfig()))["conv_proj"].block_size == 4
    with pytest.raises(ValueError, match="block size 9 does not divide its input size 147"):
        plan(resnet, PQConfig(overrides={"conv1": BlockSpec(block_size=9, k=256)}))


def test_teacher_arch_kwargs_reach_the_builder_and_the_packed_file(tmp_path):
    """teacher.arch_kwargs: a builder's own arguments (a compact ViT's width and depth, a
    MobileNetV2's width) are checked with the recipe, build the teacher, and are recorded in the
    packed file's architecture; the data set's num_classes and in_channels stay the pipeline's."""
    from modelpress import stages
    from modelpress.recipe import Recipe, RecipeError
    from modelpress.stages.pipeline import _arch

    raw = {"data": {"name": "cifar10", "files": {"cifar10-train.npz": "0" * 64, "cifar10-test.npz": "1" * 64}},
           "teacher": {"arch": "cifar_vit", "arch_kwargs": {"num_layers": 2, "hidden_dim": 64, "mlp_dim": 128}}}
    r = Recipe.parse(raw)
    arch = _arch(r)
    assert arch == {"name": "cifar_vit", "kwargs": {"num_classes": 10, "in_channels": 3, "num_layers": 2, "hidden_dim": 64,
                                                    "mlp_dim": 128}}
    stages.preflight(r)  # builds it and runs a 3x32x32 input through it
    with pytest.raises(RecipeError, match="takes no argument 'depth'"):
        Recipe.parse({**raw, "teacher": {"arch": "cifar_vit", "arch_kwargs": {"depth": 2}}})
    with pytest.raises(RecipeError, match="num_classes and in_channels come from the data set"):
        Recipe.parse({**raw, "teacher": {"arch": "cifar_vit", "arch_kwargs": {"num_classes": 100}}})
    with pytest.raises(RecipeError, match="out of bounds"):
        Recipe.parse({**raw, "teacher": {"arch": "cifar_vit", "arch_kwargs": {"hidden_dim": 10**7}}})
    wide = Recipe.parse({**raw, "teacher": {"arch": "torchvision:mobilenet_v2", "arch_kwargs": {"width_mult": 0.5}}})
    assert _arch(wide)["kwargs"] == {"num_classes": 10, "width_mult": 0.5}
    assert "arch_kwargs" not in Recipe().model_dump(mode="json")["teacher"]  # empty: no key of earlier runs changes


def test_the_budget_chooses_each_layers_codebook_storage(tmp_path, capsys):
    """method.budget_codebooks: every candidate's damage is measured with its codebook as each
    storage keeps it, and each layer gets its own: grouped scales (g6) for the layer whose few
    outlier rows make outlier centroids (with one scale per position, i6, they coarsen every other
    centroid), the cheaper i6 elsewhere. The packed file stores each layer's codebook so and
    loads to the compressed module's outputs."""
    from modelpress import compress
    from modelpress.pack import load_packed, pack_model, read_packed
    from modelpress.pack.arch import arch_spec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight[:3] *= 40  # three outlier rows: their sub-vectors become outlier centroids
    x = torch.randn(512, 64)
    cfg = PQConfig(target_bytes=16_000, budget_scope="layers", budget_k=[64], budget_codebooks=["i6", "g6"],
                   budget_linear_blocks=[4], exclude=["4"], kmeans_iters=10, layer_finetune_epochs=0)
    student, stats = compress(copy.deepcopy(model), cfg, calibration=x, teacher=model, codebook_dtype="i6")
    own = {s["layer"]: s.get("codebook") for s in stats}
    assert own == {"0": "g6", "2": "i6"}, own
    path = tmp_path / "m.mpk"
    pack_model(student, path, arch_spec("custom:mlp"), float_dtype="f32", codebook_dtype="i6", layer_codebooks=own)
    cb = {name: p.get("cb") for name, enc, p, _ in read_packed(path).entries if enc == "pq"}
    assert cb == {"0.weight": "g6", "2.weight": "i6"}
    from modelpress.pack import round_codebook

    with torch.no_grad():
        for name, layer in student.named_modules():
            if isinstance(layer, PQLayer):
                layer.codebook.copy_(round_codebook(layer.codebook, own[name]))
        loaded, _ = load_packed(path, skeleton=copy.deepcopy(model))
        assert torch.equal(loaded(x[:8]), student.eval()(x[:8]))
    from modelpress import cli  # the user's own class: inspect reads the file without building the model

    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture custom:mlp" in out and f"weights: {sum(p.numel() for n, p in model.named_parameters() if n.endswith('weight')):,}," in out
    with pytest.raises(ValueError, match="budget_codebooks is the byte budget's choice"):
        PQConfig(budget_codebooks=["i6"])
