"""MLflow pyfunc model (models-from-code) serving a modelpress packed file.

MLflow stores this file with the model; at load time it rebuilds the network from the packed
file alone (no pickle) and predicts logits for a float32 batch shaped like the input example.
"""

import mlflow
import numpy as np
import torch

from modelpress.pack import load_packed


class PackedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model, self.meta = load_packed(context.artifacts["packed"])

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


mlflow.models.set_model(PackedModel())
