"""A text encoder through the whole pipeline, registry and consumer included.

    python bench/text_encoder.py                          # PQ, Linear blocks of 4, k = 256, 8-bit codebooks
    python bench/text_encoder.py -S method.linear.k=64 --keep /tmp/text-run

Made offline, here: a text data set of real English, the sentences of Python's own language
reference (``pydoc_data.topics``, shipped with every CPython; 1,889 sentences with this
interpreter), split 4:1 into ``train.jsonl`` / ``test.jsonl``; a BERT-style encoder folder (transformers' ``BertModel``, 4
layers, hidden 256, 4 heads, random weights: the mechanics, not a trained model) with a WordPiece
``tokenizer.json`` trained on the training texts. Then the real command, ``modelpress run`` with
``data.name: text-jsonl`` and ``teacher.arch: hf:<folder>/``, registering into a throw-away MLflow
store; then a consumer in a fresh process loads the version by alias and embeds test sentences
(strings in, embeddings out); its vectors are compared with ``load_packed`` + the tokenizer + mean
pooling in this process. Prints the stage times, the sizes and the embedding cosine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from run_bench import print_timings, run  # bench/, the folder of this script

CONSUMER = r"""
import json, sys
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(json.loads(open(sys.argv[2]).read())))
"""


def sentences() -> list[str]:
    import pydoc_data.topics

    text = " ".join(" ".join(pydoc_data.topics.topics.values()).split())
    out = {s.strip() for s in re.split(r"(?<=[.!?])\s+", text)}
    return sorted(s for s in out if 40 <= len(s) <= 300 and not re.search(r"[{}=<>\[\]\\]", s))


def write_corpus(folder: Path) -> tuple[dict[str, str], list[str]]:
    texts = sentences()
    random.Random(0).shuffle(texts)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    cut = len(texts) * 4 // 5
    for name, part in (("train.jsonl", texts[:cut]), ("test.jsonl", texts[cut:])):
        (folder / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part), encoding="utf-8")
        files[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return files, texts[cut:]


def write_encoder(folder: Path, train_texts: list[str]) -> None:
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(train_texts, tokenizers.trainers.WordPieceTrainer(vocab_size=8000, special_tokens=specials))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=1024, max_position_embeddings=256)
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-S", "--set", action="append", default=[], help="a parameter override (section.key=value)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep the folder (data set, encoder, work directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep).resolve() if args.keep else Path(tmp)
        files, test_texts = write_corpus(root / "corpus")
        write_encoder(root / "encoder", [json.loads(line)["text"] for line in (root / "corpus" / "train.jsonl").open()])
        params = {
            "run": {"name": "text-encoder-pq", "workdir": str(root / "work")},
            "data": {"name": "text-jsonl", "sources": [str(root / "corpus")], "files": files, "max_tokens": 64, "batch_size": 64},
            "teacher": {"arch": f"hf:{root / 'encoder'}/"},
            "method": {"name": "pq", "linear": {"block_size": 4, "k": 256}, "calibration_images": 512, "kmeans_iters": 15,
                       "layer_finetune_epochs": 0.05},
            "finetune": {"epochs": 2, "lr": 0.0005, "batch_size": 32, "bn_batches": 0},
            "pack": {"codebook_dtype": "i8"},
            "registry": {"model_name": "text-encoder-pq"},
        }
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "PREFECT_HOME": f"{root}/prefect"}
        work = root / "work"
        timings, metrics, wall = run(root / "params.yaml", args.set, work, env)

        probe = test_texts[:64]
        (root / "probe.json").write_text(json.dumps(probe))
        t1 = time.perf_counter()
        consumer = subprocess.run([sys.executable, "-c", CONSUMER, "models:/text-encoder-pq@candidate", str(root / "probe.json"),
                                   str(root / "e.npy")], cwd=tmp, env=env, capture_output=True, text=True)
        consumer_s = time.perf_counter() - t1
        if consumer.returncode:
            sys.exit(f"consumer failed:\n{consumer.stderr[-3000:]}")
        got = np.load(root / "e.npy")

        from modelpress.data.text import embedding_cosine, load_tokenizer, sentence_embedding, tokenize
        from modelpress.models import build_model
        from modelpress.pack import load_packed

        model, meta = load_packed(work / "model.mpk")
        x = tokenize(load_tokenizer(root / "encoder"), probe, 64)
        teacher = build_model(f"hf:{root / 'encoder'}/")
        with torch.no_grad():
            mine = sentence_embedding(model(**x), x["attention_mask"])
            ref = sentence_embedding(teacher(**x), x["attention_mask"])
        raw = float(torch.nn.functional.cosine_similarity(mine, ref).mean()) * 100

    print_timings(timings, wall)
    print(f"encoder: {sum(p.numel() for p in teacher.parameters()):,} parameters, "
          f"{metrics['teacher_fp32_bytes']:,} fp32 bytes; packed {metrics['packed_bytes']:,} bytes "
          f"({metrics['compression_ratio']:.1f}x), {metrics['layers_quantized']} layers quantized")
    print(f"embedding cosine to the teacher on {metrics['test_images']} test texts (centred): {metrics['compressed_top1']:.2f} %; "
          f"uncentred on the probe: {raw:.2f} %; centred on the probe: {embedding_cosine(mine, ref):.2f} %")
    print(f"consumer (fresh process, models:/text-encoder-pq@candidate, {len(probe)} strings): {consumer_s:.1f} s, "
          f"output {tuple(got.shape)}, max |difference| to load_packed + tokenizer: {float(np.abs(got - mine.numpy()).max()):.2e}")
    print(f"packed file input metadata: {meta['input']}")


if __name__ == "__main__":
    main()
