"""The paging engine: stream dense decoder layers from safetensors, page MoE experts.

Runs only in the experimental venv (torch, transformers, safetensors).
"""
