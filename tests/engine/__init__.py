"""Tests of llmws_core.engine."""
