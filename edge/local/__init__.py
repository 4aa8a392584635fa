"""The gateway's local HTTP endpoint: metrics, health and the status page (docs/local.md).

Read-only, served by the daemon on a local address; never on the control path.
"""
