"""The drift and quality monitor's pure parts: statistics, window summaries, decisions, reports.

No I/O here: the faust application in ``workers/monitor`` feeds these with decoded events and
writes what they return to Kafka and the object store.
"""
