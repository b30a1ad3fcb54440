"""Micro-batching: pure queues per (model, version), flushed by size or by wait time."""

from pipeline.batching.batcher import Batch, Lane, MicroBatcher, Pending

__all__ = ["Batch", "Lane", "MicroBatcher", "Pending"]
