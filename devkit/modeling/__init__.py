"""The demo model: a seeded SAP-style invoice generator, a numpy logistic model, its metrics.

Nothing here does I/O except ``training`` (which writes the Triton model repository), so the
generator, the fit and the metrics are unit-tested as plain functions.
"""
