"""Dense layer streaming: the model store, the streamer with its slot ring and RAM cache, and the
per-layer precise/fast variants.
"""
