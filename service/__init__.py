"""The HTTP search service (FastAPI) and its web page: the engine behind /api/v1, micro-batched
on one worker thread per index. Imports core, indexer and engine only; the caller (cli.py serve)
hands in the engine factory that knows the query encoder."""
