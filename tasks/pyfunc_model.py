"""MLflow pyfunc model (models-from-code) serving a modelpress packed file.

MLflow stores this file with the model; at load time it rebuilds the network from the packed
file alone (no pickle). An image model predicts logits for a float32 batch shaped like the input
example; a text model (its file's input ``kind`` is ``tokens``) takes strings, tokenizes them
with the ``tokenizer.json`` logged beside the file and returns their sentence embeddings (an
encoder) or their labels (a sequence classifier). Inputs are run in batches of ``BATCH`` on the
device the module is on (a consumer may move ``unwrap_python_model().model`` to a GPU).

Each version runs the library it was registered with (its ``code/modelpress``): as
``modelpress`` when the process has imported none yet, or one of the very same files; otherwise
under a name of its own, ``_modelpress_<digest of its files>``. A process that loads several
versions (champion and candidate side by side), or that imported another modelpress itself,
never runs one version with another's code (MLflow only puts each version's code folder on
``sys.path``, where the first ``modelpress`` imported would serve them all), and loading a
version again reuses its modules.
"""

import hashlib
import importlib
import importlib.util
import itertools
import sys
import threading
from pathlib import Path

import mlflow
import numpy as np
import torch

BATCH = 256
_IMPORTING = threading.Lock()


def code_digest(package: Path) -> str:
    """sha256 of a modelpress package's Python files, their paths and contents (the orchestration,
    installed as modelpress/flows and modelpress/tasks, is not logged with a version: left out)."""
    h = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        rel = f.relative_to(package)
        if "__pycache__" in rel.parts or (len(rel.parts) > 1 and rel.parts[0] in ("flows", "tasks")):
            continue
        h.update(rel.as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def own_library(code: Path):
    """The modelpress package of ``code`` (a model version's logged code folder), imported as said
    above; the importable ``modelpress`` where ``code`` has none (this file run from the repository)."""
    package = code / "modelpress"
    if not (package / "__init__.py").is_file():
        return importlib.import_module("modelpress")
    digest = code_digest(package)
    with _IMPORTING:
        current = sys.modules.get("modelpress") or importlib.import_module("modelpress")  # MLflow put code/ first
        if code_digest(Path(current.__file__).parent) == digest:
            return current
        name = f"_modelpress_{digest[:16]}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                          submodule_search_locations=[str(package)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        return sys.modules[name]


LIBRARY = own_library(Path(__file__).resolve().parent / "code")  # MLflow runs this file from the model's folder
_pack = importlib.import_module(LIBRARY.__name__ + ".pack")
sha256_file = importlib.import_module(LIBRARY.__name__ + ".data.fetch").sha256_file
load_packed = _pack.load_packed


class PackedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        expected, got = (context.model_config or {}).get("packed_sha256"), sha256_file(context.artifacts["packed"])
        if expected and got != expected:  # not the registered file: damaged, or another packed file in its place
            _pack.read_packed(context.artifacts["packed"])  # a damaged file: its own checksum error says so
            raise ValueError(f"the packed file of this model version is not the one it was registered with "
                             f"(sha256 {got[:16]}..., registered {expected[:16]}...)")
        self.model, self.meta = load_packed(context.artifacts["packed"])
        self.tokenizer = None
        if self.meta.get("input", {}).get("kind") == "tokens":
            self.tokenizer = _text().load_tokenizer(context.artifacts["tokenizer"])

    def predict(self, context, model_input, params=None):
        if self.tokenizer is not None:
            return self._embed(model_input)
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        shape = tuple(self.meta.get("input", {}).get("shape") or ())
        if shape and tuple(x.shape[1:]) != shape:
            raise ValueError(f"inputs of shape {tuple(x.shape)}: this model takes float32 (N, {', '.join(map(str, shape))})")
        device, dtype = self._device(), self._dtype()  # where the module is, and its precision (a consumer may move it)
        with torch.no_grad():
            parts = [self.model(x[i:i + BATCH].to(device, dtype)).float().cpu() for i in range(0, len(x), BATCH)]
            if not parts:  # no input: no rows, the output's own width
                parts = [self.model(torch.zeros(1, *x.shape[1:], device=device, dtype=dtype)).float().cpu()[:0]]
        return torch.cat(parts).numpy()

    def _device(self) -> torch.device:
        return next(itertools.chain(self.model.parameters(), self.model.buffers()), torch.empty(0)).device

    def _dtype(self) -> torch.dtype:
        floats = (t.dtype for t in self.model.parameters() if t.is_floating_point())
        return next(floats, torch.float32)

    def _embed(self, model_input):
        sentence_embedding, tokenize = _text().sentence_embedding, _text().tokenize
        if hasattr(model_input, "iloc"):  # a one-column table (what a list of strings becomes in MLflow's schema)
            model_input = model_input.iloc[:, 0]
        texts = [str(t) for t in list(model_input)]
        if not texts:
            raise ValueError("no text to encode: give a list of strings (or a one-column table)")
        device, parts = self._device(), []
        for i in range(0, len(texts), BATCH):
            x = {k: v.to(device) for k, v in tokenize(self.tokenizer, texts[i:i + BATCH], int(self.meta["input"]["max_tokens"])).items()}
            with torch.no_grad():
                out = self.model(**x)
            if "classes" in self.meta["input"]:  # a sequence classifier: the label of each text
                parts.append(out["logits"].argmax(-1).cpu())
            else:
                parts.append(sentence_embedding(out, x["attention_mask"]).float().cpu())
        return torch.cat(parts).numpy()


def _text():
    return importlib.import_module(LIBRARY.__name__ + ".data.text")


mlflow.models.set_model(PackedModel())
