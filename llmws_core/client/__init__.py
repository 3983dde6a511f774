"""Clients: the async library and the prompt-toolkit REPL."""
