"""Running as a service: sd_notify, the state-dir lock and logging setup (the systemd unit
itself is rendered by `lab-attendant service`, lab_attendant.cli.service).
"""
