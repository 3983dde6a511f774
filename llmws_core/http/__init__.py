"""The HTTP/SSE adapter: one module per surface, all over the chat service."""
