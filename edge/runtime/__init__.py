"""The daemon and what keeps it running: supervision, backoff, health, systemd, logs."""
