"""Sessions: sealed replay buffers and conversation state on disk."""
