"""MoE expert paging: the host expert store, the device expert cache, the pager that stands in
for a family's experts module, and the loader.
"""
