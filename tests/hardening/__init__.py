"""Hardening tests: hostile input, crashes, write failures, limits and load."""
