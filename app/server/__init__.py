"""The OpenAI-compatible HTTP endpoint: request/response shapes (protocol.py) and the aiohttp app (app.py)."""
