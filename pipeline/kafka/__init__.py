"""Kafka at the edge: clients are built here from settings and errors are wrapped."""
