"""Running as a service: the systemd unit, sd_notify, the state-dir lock and logging setup.
"""
