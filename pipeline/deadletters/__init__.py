"""Working with dead letters once they are written: read, select, mark, plan a replay.

Pure logic, no I/O: ``sluiceway dlq`` (``sluiceway/dlq_cmd.py``) reads the DLQ and the
handled-letters topic and hands the records in; ``docs/operations.md`` tells the operator's
side of it.
"""
