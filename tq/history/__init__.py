"""Task history: export finished tasks over the protocol, query them with DuckDB."""
