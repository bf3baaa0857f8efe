"""The OpenAI-compatible HTTP server (`engine serve`).

Only `engine.server.cli` may be imported without FastAPI/uvicorn installed: the offline
engine and the benchmarks never import anything else from this package.
"""
