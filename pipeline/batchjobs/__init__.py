"""Bulk batch jobs: a file in, ``results.jsonl`` and ``errors.jsonl`` out (see docs/batch.md).

Pure rules (reading formats, record rules, lifecycle and progress) live here next to the
object-store edge (:mod:`pipeline.batchjobs.store`); the runner that talks to Kafka is in
``workers/batch``.
"""
