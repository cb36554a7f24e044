"""`lab-attendant dashboard`: a read-only web view of the store (runs, sensor history, guards,
schedules), its JSON API and /metrics; server-side SVG plots, no CDN, binds to loopback.
"""
