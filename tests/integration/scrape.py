"""Reading a Sluiceway process's HTTP endpoint: its metric names and its health answers."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}


def get(port: int, path: str) -> tuple[int, str]:
    """Status and body of ``GET http://127.0.0.1:<port><path>`` (4xx/5xx included)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def answers(port: int, path: str) -> bool:
    """Whether the endpoint answers at all (the process may still be starting)."""
    try:
        get(port, path)
    except OSError:
        return False
    return True


def exposed_names(port: int) -> tuple[set[str], set[str]]:
    """(every sample name the process's families can expose, the sample names it has now).

    A labelled family with no children yet is still exposed (HELP and TYPE lines); its sample
    names follow from its type, as Prometheus will store them.
    """
    status, text = get(port, "/metrics")
    assert status == 200, text
    possible: set[str] = set()
    present: set[str] = set()
    for family in text_string_to_metric_families(text):
        possible.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES[family.type])
        present.update(sample.name for sample in family.samples)
    return possible | present, present


def sample_total(port: int, name: str, **labels: str) -> float:
    """The sum of the process's samples called ``name`` whose labels include ``labels``."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )
