"""The batch-job runner service (``sluiceway batch run``)."""
