"""The site profile: its YAML source, its building blocks and the whole model (docs/profile.md).

Imports nothing on purpose: edge.config.types is imported by every driver's
config module, which edge.config.profile in turn loads through drivers.registry.
"""
