"""The engine: model discovery, loading, memory arithmetic and backends."""
