"""Protocol drivers, one package each: asset drivers behind edge.asset.AssetDriver,
and the grid operator's link (drivers/deie/) behind edge.gridorders.GridOperatorLink.

Every package registers itself once (its ``DRIVER`` or ``GRID_LINK``), and
``drivers/registry.py`` lists them; a driver's protocol stack is imported only
when a profile uses it.
"""
