"""Triton python-backend model: y = x * scale, the scale taken from config per version.

All requests Triton's dynamic batcher hands over in one ``execute`` call are computed as one
stacked array, the way a real model would batch them.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        version = args["model_version"]
        self.scale = np.float32(config["parameters"][f"scale_version_{version}"]["string_value"])

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        rows = [batch.shape[0] for batch in inputs]
        outputs = np.concatenate(inputs, axis=0) * self.scale
        responses = []
        for part in np.split(outputs, np.cumsum(rows)[:-1]):
            tensor = pb_utils.Tensor("y", part.astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
