"""The native local stack: Kafka, MinIO and Triton as plain processes, no Docker."""
