"""The paging engine: stream dense decoder layers from safetensors, page MoE experts.

`plan/` is torch-free (the supervisor imports it for `model plan` and submit checks); `dense/`, `moe/`
and the modules here need torch and run only in the experimental venv.
"""
