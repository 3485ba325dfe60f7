"""Base models: the embedded GGUF, a hub id or the tiny test model, materialized as one local directory.
Imports: `arca.io` only."""
