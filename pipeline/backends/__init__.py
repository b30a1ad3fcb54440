"""Inference backends behind one small interface: Triton (KServe v2) and vLLM (OpenAI API)."""

from pipeline.backends.base import Backend, RowInput, RowOutput, TextPrompt
from pipeline.backends.exceptions import BackendError

__all__ = [
    "Backend",
    "BackendError",
    "RowInput",
    "RowOutput",
    "TextPrompt",
]
