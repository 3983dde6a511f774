"""LLMWS: a local LLM server whose conversations survive anything."""

__version__ = "0.1.0"
