"""The broker: deterministic state machine, durable command log, TCP server."""
