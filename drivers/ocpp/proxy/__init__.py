"""The OCPP local controller: chargers keep their CPO backend, the gateway keeps their power.

A charger whose profile has ``upstream:`` (``config.UpstreamLink``) connects to the gateway as
any other; the gateway opens one websocket per charger to the backend with the OCPP version the
charger negotiated and forwards messages both ways unchanged (``forward``), reading them for
its own state.  Its own grid limit goes to the charger under a purpose the charger combines
with the backend's profiles by minimum; the backend's profile requests that would replace or
outrank it are refused (``rules``).  While the backend is unreachable the gateway answers the
charger itself (``local``) and queues the transaction messages (``queue``), replayed in order on
the next link (``link``).  ``point`` has the session and connection classes the central system
uses for a proxied charger.  docs/drivers/ocpp.md, "Local controller".

Only ``config`` is imported with the profile; the rest loads with the central system.
"""
