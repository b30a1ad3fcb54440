"""Salesforce's Pub/Sub API protocol messages (``pubsub_api.proto``, vendored; see README.md).

Only the message classes are generated (``pubsub_api_pb2.py`` and its typed ``.pyi``); the
gRPC method paths are spelled out in :mod:`connectors.salesforce.pubsub`, so no generated
service stub is needed and nothing here depends on a grpcio-tools version at run time.
"""
