"""The worker runtime: handler registry, claim loop, built-in handlers."""
