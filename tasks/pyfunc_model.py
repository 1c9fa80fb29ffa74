"""MLflow pyfunc model (models-from-code) serving a modelpress packed file.

MLflow stores this file with the model; at load time it rebuilds the network from the packed
file alone (no pickle). An image model predicts logits for a float32 batch shaped like the input
example; a text model (its file's input ``kind`` is ``tokens``) takes strings, tokenizes them
with the ``tokenizer.json`` logged beside the file and returns their sentence embeddings (an
encoder) or their labels (a sequence classifier).
"""

import mlflow
import numpy as np
import torch

from modelpress.pack import load_packed


class PackedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model, self.meta = load_packed(context.artifacts["packed"])
        self.tokenizer = None
        if self.meta.get("input", {}).get("kind") == "tokens":
            from modelpress.data.text import load_tokenizer

            self.tokenizer = load_tokenizer(context.artifacts["tokenizer"])

    def predict(self, context, model_input, params=None):
        if self.tokenizer is not None:
            return self._embed(model_input)
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()

    def _embed(self, model_input):
        from modelpress.data.text import sentence_embedding, tokenize

        if hasattr(model_input, "iloc"):  # a one-column table (what a list of strings becomes in MLflow's schema)
            model_input = model_input.iloc[:, 0]
        texts = [str(t) for t in list(model_input)]
        x = tokenize(self.tokenizer, texts, int(self.meta["input"]["max_tokens"]))
        with torch.no_grad():
            out = self.model(**x)
        if "classes" in self.meta["input"]:  # a sequence classifier: the label of each text
            return out["logits"].argmax(-1).numpy()
        return sentence_embedding(out, x["attention_mask"]).numpy()


mlflow.models.set_model(PackedModel())
