"""The worker's HTTP surface: `create_app` (app.py) over the engine, OpenAI shapes (protocol.py),
the error table (errors.py), the data plane (serving.py, streaming.py), graceful shutdown (shutdown.py)."""
