"""The object store at the edge: a MinIO/S3 client built from settings."""
