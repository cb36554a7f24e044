"""The `lab-attendant` command: the parser (main) and one module per verb group, each with
`register(subparsers)`; verbs print what the store and the domain modules return.
"""
