"""The monitor's reference distribution, kept in the object store beside the results.

``sluiceway model train`` writes ``reference_sample.npz`` (reference invoices and what a healthy
version predicts for them) into the model repository. The monitor reads it from the object
store at ``references/<model>/reference_sample.npz``, publishing it there first from
``monitor.reference_dir`` (the model repository, on the local stack) when the store has none,
so every monitor replica compares against the same sample.
"""

from __future__ import annotations

import io

import numpy as np
from minio import Minio
from minio.error import S3Error

from pipeline.monitoring.windows import Reference
from pipeline.settings import Settings
from schemas.errors import SluicewayError

REFERENCE_SAMPLE = "reference_sample.npz"
"""The file a model's reference is kept in: ``feature_names``, ``x`` (reference inputs) and
``scores`` (what a healthy version predicts for them), as ``numpy.savez`` writes them."""


class ReferenceMissingError(SluicewayError):
    """Neither the object store nor the model repository has a reference for the model."""


def reference_key(model: str) -> str:
    return f"references/{model}/{REFERENCE_SAMPLE}"


def load_reference(settings: Settings, store: Minio, model: str) -> Reference:
    bucket = settings.object_store.bucket
    key = reference_key(model)
    try:
        response = store.get_object(bucket, key)
        try:
            body = response.read()
        finally:
            response.close()
            response.release_conn()
    except S3Error as error:
        if error.code != "NoSuchKey":
            raise
        folder = settings.monitor.reference_dir
        local = None if folder is None else folder / model / REFERENCE_SAMPLE
        if local is None or not local.is_file():
            raise ReferenceMissingError(
                f"no reference for {model}: s3://{bucket}/{key} does not exist"
                + ("" if local is None else f", nor does {local}")
                + " (`sluiceway model train` writes one)"
            ) from error
        body = local.read_bytes()
        store.put_object(bucket, key, io.BytesIO(body), len(body))
    with np.load(io.BytesIO(body), allow_pickle=False) as sample:
        names = [str(n) for n in sample["feature_names"]]
        return Reference.build(sample["x"], names, sample["scores"])
