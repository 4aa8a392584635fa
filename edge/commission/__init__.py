"""Commissioning tools run by a person at the site: `flexedge probe` and `flexedge diagnostics`.

They run outside the daemon, once, from the command line; each speaks to a device or to a
running gateway with bounded timeouts and prints what it found (docs/cli.md).
"""
