"""The daemon: the loop, its wake-up, start-up reconcile, worker events, outcomes and notifications.
It calls the store for every state change and an executor for every worker.
"""
