"""The `otclip` command: one entry point dispatching to engine, indexer, training and app."""
