"""The memory plan, torch-free (the supervisor imports it): device profiles, model shapes from
config.json and headers, budgets, MoE layouts.
"""
