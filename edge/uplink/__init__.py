"""The link to the VPP: MQTT, the on-disk spool, and the messages' contract (docs/mqtt-api.md)."""
