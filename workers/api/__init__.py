"""``sluiceway api``: the OpenAI-compatible Batch and Files API in front of batch jobs.

Pure rules (OpenAI shapes, tenants and limits, pagination, idempotency) are in their own
modules; :mod:`workers.api.files` is the object-store edge and :mod:`workers.api.server` the
HTTP edge. See docs/api.md.
"""
