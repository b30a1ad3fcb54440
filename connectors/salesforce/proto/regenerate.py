"""Regenerate ``pubsub_api_pb2.py`` and ``pubsub_api_pb2.pyi`` from the vendored ``.proto``.

Run from the repository root: ``python -m connectors.salesforce.proto.regenerate``. It needs
``grpcio-tools`` importable (``pip install 'grpcio-tools==1.76.*'`` in a throwaway venv and
run it with that interpreter); a ``git diff --exit-code`` afterwards proves the committed files
are what the compiler produces.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    try:
        from grpc_tools import protoc
    except ImportError:
        print("regenerate: grpcio-tools is not installed in this interpreter", file=sys.stderr)
        return 2
    arguments = [
        "protoc",
        f"-I{HERE}",
        f"--python_out={HERE}",
        f"--pyi_out={HERE}",
        str(HERE / "pubsub_api.proto"),
    ]
    return int(protoc.main(arguments))


if __name__ == "__main__":
    sys.exit(main())
