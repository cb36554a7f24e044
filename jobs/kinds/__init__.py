"""One module per job kind: a plain `run(params, ctx)`-style function registered in
jobs.contract.kinds; they run inside the worker (experimental venv).
"""
