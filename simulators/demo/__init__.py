"""`flexedge demo`: the demo site on the bundled simulators (docs/cli.md)."""
