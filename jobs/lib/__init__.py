"""Helpers the job kinds share: embeddings, clustering, rubric scoring, the archive manifest,
artifact files and the model helper (`llm.Engine`). `llm` and `embed` need torch; the rest is stdlib."""
