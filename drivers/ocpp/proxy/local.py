"""The gateway's own handling of a proxied charger's CALL: read it for state, or answer it.

``read_state`` runs the gateway's handler for a message that goes upstream: the session
learns from it, and the handler's answer is dropped (the backend's is the charger's).
``answer_locally`` answers the charger as its central system would while the backend is
unreachable; ``state_read`` says the handler already ran for this message, so only what
the answer needs is worked out again (a second run would report a session's end twice).
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any, Callable

from ocpp.charge_point import camel_to_snake_case, remove_nones, serialize_as_dict, snake_to_camel_case
from ocpp.exceptions import OCPPError
from ocpp.messages import Call

from drivers.ocpp.handlers import now_iso

log = logging.getLogger("flexedge.drivers.ocpp.proxy")

# Answers that carry nothing the gateway would have to decide again.
_EMPTY_ANSWERS = ("StopTransaction", "MeterValues", "StatusNotification", "Heartbeat", "NotifyReport")


async def read_state(point: Any, session: Any, msg: Call) -> Any:
    """The handler's answer (not sent), or None when the gateway has no handler or cannot read it."""
    handler = (point.route_map.get(msg.action) or {}).get("_on_action")
    if handler is None:
        return None
    session.quiet = True  # the backend authorizes: no authorization_rejected from the local list
    try:
        response = handler(**camel_to_snake_case(msg.payload))
        if inspect.isawaitable(response):
            response = await response
        return response
    except Exception as error:  # a message the handler cannot read still goes upstream
        log.debug("%s: %s not read by the gateway: %r", point.id, msg.action, error)
        return None
    finally:
        session.quiet = False


def _answer_again(point: Any, msg: Call) -> Any:
    if msg.action == "TransactionEvent":  # only the token is to be answered
        token = msg.payload.get("idToken")
        return point.results.TransactionEvent(
            id_token_info=point._token_info(camel_to_snake_case(token)) if isinstance(token, dict) else None)
    results = point._call_result
    if msg.action == "Heartbeat":
        return results.Heartbeat(current_time=now_iso())
    return getattr(results, msg.action)()


async def answer_locally(point: Any, msg: Call, state_read: bool, spawn: Callable) -> dict[str, Any] | None:
    """Send the gateway's answer to the charger; its CALLRESULT payload, None when a CALLERROR went."""
    handlers = point.route_map.get(msg.action) or {}
    handler = handlers.get("_on_action")
    if handler is None:
        await point._send(json.dumps([4, msg.unique_id, "NotImplemented", f"{msg.action}: backend unreachable", {}]))
        return None
    try:
        if state_read and (msg.action in _EMPTY_ANSWERS or msg.action == "TransactionEvent"):
            response = _answer_again(point, msg)
        else:
            response = handler(**camel_to_snake_case(msg.payload))
            if inspect.isawaitable(response):
                response = await response
    except Exception as error:
        log.info("%s: %s answered with an error: %r", point.id, msg.action, error)
        code = type(error).__name__ if isinstance(error, OCPPError) else "InternalError"
        await point._send(json.dumps([4, msg.unique_id, code, str(error)[:200], {}]))
        return None
    payload = snake_to_camel_case(remove_nones(serialize_as_dict(response)))
    await point._send(msg.create_call_result(payload).to_json())
    after = handlers.get("_after_action")  # the boot gate opens here (handlers.after_boot)
    if after is not None:
        try:
            result = after(**camel_to_snake_case(msg.payload))
            if inspect.isawaitable(result):
                spawn(result)
        except Exception:
            log.exception("%s: after %s", point.id, msg.action)
    return payload
