"""Guards: the thermal/RAM/VRAM policy, GPU co-tenants (EarNode), and the host seam (NVML, psutil,
signals, clocks) that tests replace.
"""
