"""A faust-streaming app for the broker proof test: upper-cases each event onto a sink topic.

Configured by environment variables so the test chooses fresh topics for each run.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import faust

Path(".sluiceway/faust").mkdir(parents=True, exist_ok=True)  # faust makes only the last folder
app = faust.App(
    os.environ.get("FAUST_ECHO_APP", "sluiceway-echo"),
    broker=os.environ.get("FAUST_ECHO_BROKER", "kafka://127.0.0.1:9092"),
    store="memory://",
    datadir=".sluiceway/faust/{conf.name}",
    web_enabled=False,
    topic_partitions=1,
)
source = app.topic(os.environ.get("FAUST_ECHO_SOURCE", "echo-in"), value_serializer="raw")
sink = app.topic(os.environ.get("FAUST_ECHO_SINK", "echo-out"), value_serializer="raw")


@app.agent(source)
async def echo(stream: AsyncIterator[bytes]) -> None:
    async for value in stream:
        await sink.send(value=value.upper())
