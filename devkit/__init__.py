"""The development wing: what runs Sluiceway on one machine, never in a deployment.

- :mod:`devkit.stack`: installs and runs the native Kafka, MinIO and Triton (``sluiceway stack``);
- :mod:`devkit.modeling`: the demo's synthetic invoices and the models trained on them;
- :mod:`devkit.demo`: ``sluiceway demo`` end to end, its settings file, feeds and examples;
- :mod:`devkit.servers`: protocol servers standing in for systems that cannot run here (vLLM).

Runtime code (``schemas``, ``pipeline``, ``workers``, ``connectors``) never imports this package;
an import-linter contract in ``make test`` holds that line.
"""
