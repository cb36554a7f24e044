"""The store: tables and migrations, run states, and the whole run lifecycle (submit, transition,
hold/release, retry, cancel of unsatisfiable dependents), samples, write-behind on faults, backups.
"""
