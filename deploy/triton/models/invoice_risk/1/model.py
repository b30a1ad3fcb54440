"""Triton python-backend model: logistic invoice-risk score with exact linear attributions.

Every request in one ``execute`` call (Triton's dynamic batcher merges the worker's concurrent
multi-row requests) is scored as one stacked array. Attributions are the per-feature terms of
the logit measured from the baseline invoice, so they add up exactly to
``logit(x) - logit(baseline)``. They are computed, again as one stacked array, only for the
requests that list the ``attributions`` output; the ``sluiceway_attribution_rows`` counter on
Triton's metrics endpoint counts those rows, so the on-demand claim can be checked from outside.
"""

import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "weights.npz")
        with np.load(path, allow_pickle=False) as weights:
            self.log_features = weights["log_features"].astype(bool)
            self.mean = weights["mean"].astype(np.float64)
            self.scale = weights["scale"].astype(np.float64)
            self.coef = weights["coef"].astype(np.float64)
            self.intercept = float(weights["intercept"])
            self.baseline = self._transform(weights["baseline"].astype(np.float64))
        # The family must outlive its metric, so the model keeps both.
        self.attribution_family = pb_utils.MetricFamily(
            name="sluiceway_attribution_rows",
            description="Rows whose attributions this model computed",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.attribution_rows = self.attribution_family.Metric(
            labels={"model": args["model_name"], "version": args["model_version"]}
        )

    def _transform(self, x):
        return np.where(self.log_features, np.log1p(np.maximum(x, 0.0)), x)

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        wanted = [set(r.requested_output_names()) for r in requests]
        explain = [not names or "attributions" in names for names in wanted]
        z = self._transform(np.concatenate(inputs, axis=0).astype(np.float64))
        logit = ((z - self.mean) / self.scale) @ self.coef + self.intercept
        score = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32).reshape(-1, 1)
        bounds = np.cumsum([0] + [batch.shape[0] for batch in inputs])
        rows = [slice(bounds[i], bounds[i + 1]) for i in range(len(requests))]
        attributions = {}
        asking = [i for i in range(len(requests)) if explain[i]]
        if asking:
            picked = np.concatenate([z[rows[i]] for i in asking], axis=0)
            values = (self.coef * (picked - self.baseline) / self.scale).astype(np.float32)
            self.attribution_rows.increment(len(picked))
            start = 0
            for i in asking:
                count = rows[i].stop - rows[i].start
                attributions[i] = values[start : start + count]
                start += count
        responses = []
        for i, names in enumerate(wanted):
            tensors = []
            if not names or "score" in names:
                tensors.append(pb_utils.Tensor("score", score[rows[i]]))
            if i in attributions:
                tensors.append(pb_utils.Tensor("attributions", attributions[i]))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
