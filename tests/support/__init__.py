"""Reusable helpers for tests that run real servers: uvicorn in a thread, Prometheus as a process."""
