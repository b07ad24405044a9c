"""The server HTTP API: what the application deploying wschat uses to talk to it.

JSON over HTTP under ``/api/`` on the operations port (``METRICS_PORT``, never
the public one), every call authenticated with ``Authorization: Bearer
<API_KEY>``; without ``API_KEY`` every call is refused (403). Messages the API
posts take the users' path (the same stores: ids, history, persistence,
recovery) with ``user_id`` ``system``. Moderation goes through
:class:`wschat.access.AccessControl`, so it holds on every worker and pod.
Errors are ``{"error": {"code", "message"}}``. The OpenAPI document below is
served at ``/api/openapi.json``; tests keep it and the routes in step.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from flask import Blueprint, Flask, Response, request
from werkzeug.exceptions import HTTPException

from .version import __version__
from .errors import WschatError
from .protocol import (
    LIFTED_USER_ID_RULE, USER_ID_RULE, ErrorCode, History, ProtocolError, SendDm, SendMessage,
    draft_dm, draft_message, parse_command, valid_lifted_user_id, valid_user_id,
)
from .stores.base import API_USER, InboxFull, Unavailable
from .stores.moderation import until_ms, until_of

if TYPE_CHECKING:
    from .chat import Chat

log = logging.getLogger("wschat.api")

SYSTEM_USER = API_USER  # the user_id of everything the API posts (reserved: see auth)
MAX_BODY_BYTES = 256 * 1024
MAX_NAME_CHARS = 64
MAX_DURATION = 10 * 365 * 86400
# A refusal of the protocol's parsing (_parsed) -> the HTTP status that fits it; any other
# is 400. Only codes parse_command raises: user_not_found (404 in /api/dm) and unavailable
# (503, from Unavailable) the API answers itself, and forbidden no call can meet.
STATUS = {ErrorCode.MESSAGE_TOO_LARGE: 413}


class ApiError(WschatError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json",
                    headers=headers)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None
           ) -> Response:
    return _reply({"error": {"code": code, "message": message}}, status, headers)


def is_api_path(path: str) -> bool:
    """A path of the server API's: ``/api`` and below, on either port."""
    return path == "/api" or path.startswith("/api/")


def not_implemented() -> Response:
    """The answer to a method HTTP does not define on an API path, which the app's WSGI
    wrapper gives before Flask sees the request (wschat.factory): as the API's other
    errors, where it was text/plain."""
    return _error(501, "not_implemented", "the method is not one HTTP defines")


def _http_error(exc: HTTPException) -> Response:
    code = (exc.name or "error").lower().replace(" ", "_")
    # The exception's own headers but its page's type: a 405's Allow (RFC 9110 15.5.6
    # requires it; the API's 405 had none), a 401's WWW-Authenticate.
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    return _error(exc.code or 500, code, exc.description or exc.name, headers or None)


# -- request parsing -------------------------------------------------------------------

try:  # what gunicorn raises for a body broken in its framing (chunked encoding gone wrong)
    from gunicorn.http.errors import ParseException as _BrokenFraming
except ImportError:  # pragma: no cover - another WSGI server
    _BrokenFraming = ValueError
# A body that cannot be read: its framing broken, or the client gone while it was sent
# (gunicorn: NoMoreData, an OSError, as a reset is).
_UNREADABLE = (_BrokenFraming, OSError, ValueError)


def _body() -> dict[str, Any]:
    try:  # bounded, with or without Content-Length
        data = request.stream.read(MAX_BODY_BYTES + 1)
    except _UNREADABLE as exc:
        # The client's error, not the server's: it was 500 internal_error and an ERROR
        # line with a traceback.
        log.debug("API call %s %s: body unreadable (%r)", request.method, request.path, exc)
        raise ApiError(400, "invalid_request", "the body could not be read (its framing "
                       "is broken, or it was cut short)") from None
    if len(data) > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"request bodies are at most {MAX_BODY_BYTES} bytes")
    try:
        body = orjson.loads(data or b"null")
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    return body


def _parsed(chat: Chat, frame: dict[str, Any]) -> Any:
    """Validate fields exactly as the WebSocket protocol does (one set of rules)."""
    try:
        return parse_command(orjson.dumps(frame), chat.limits)
    except ProtocolError as err:
        raise ApiError(STATUS.get(err.code, 400), err.code.value, err.message) from None


def _post_request(chat: Chat, kind: str, target: str) -> tuple[Any, str]:
    """A publish or dm body as the protocol command it stands for, and the sender's name."""
    body = _body()
    cmd = _parsed(chat, {"type": kind, target: body.get(target), "text": body.get("text"),
                         "client_msg_id": body.get("client_msg_id")})
    return cmd, _text_field(body, "from", MAX_NAME_CHARS) or SYSTEM_USER


def _user_id(body: dict[str, Any]) -> str:
    user_id = body.get("user_id")
    if not valid_user_id(user_id):
        # One no user can have (a control character, `system`, a `guest-` id no guest
        # has): nothing would ever match what was stored or published for it.
        raise ApiError(400, "invalid_request", USER_ID_RULE)
    return str(user_id)


def _lifted_user_id(body: dict[str, Any]) -> str:
    """The user_id of a lift (unban, unmute, a member's removal): see
    protocol.valid_lifted_user_id."""
    user_id = body.get("user_id")
    if not valid_lifted_user_id(user_id):
        raise ApiError(400, "invalid_request", LIFTED_USER_ID_RULE)
    return str(user_id)


def _optional_room(chat: Chat, body: dict[str, Any]) -> str | None:
    if body.get("room") is None:
        return None
    return str(_parsed(chat, {"type": "leave", "room": body["room"]}).room)


def _room_path(chat: Chat, room: Any) -> str:
    return str(_parsed(chat, {"type": "leave", "room": room}).room)


def _duration(body: dict[str, Any]) -> float | None:
    value = body.get("duration")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value <= MAX_DURATION):
        raise ApiError(400, "invalid_request",
                       f"'duration' must be seconds, above 0 and at most {MAX_DURATION}")
    return float(value)


def _text_field(body: dict[str, Any], name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value.strip()) <= limit or not (
            value.isprintable()):
        raise ApiError(400, "invalid_request",
                       f"'{name}' must be 1-{limit} printable characters")
    return value.strip()


_INTEGER = re.compile("-?[0-9]+")


def _int_arg(name: str, lo: int) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    # ASCII digits only, as the document's integer: Python's int() also took "1_0" (10),
    # other scripts' digits, and spaces or a "+" around them.
    if _INTEGER.fullmatch(raw) is None:
        raise ApiError(400, "invalid_request", f"'{name}' must be an integer")
    value = int(raw)
    if not lo <= value < 2**53:
        raise ApiError(400, "invalid_request", f"'{name}' is out of range")
    return value


# -- the blueprint ---------------------------------------------------------------------

def create_api(chat: Chat, clock: Callable[[], float]) -> Blueprint:
    api = Blueprint("api", __name__, url_prefix="/api")
    stores, access = chat.stores, chat.access

    @api.post("/publish")
    def publish() -> Response:
        cmd: SendMessage
        cmd, sender = _post_request(chat, "message", "room")
        draft = draft_message(cmd.room, sender, SYSTEM_USER, cmd.text, int(clock() * 1000),
                              cmd.client_msg_id)
        posted = stores.messages.post_room(cmd.room, SYSTEM_USER, draft)
        if not posted.duplicate:
            chat.metrics.posted("room")
        return _reply({"id": posted.msg_id, "room": cmd.room, "duplicate": posted.duplicate})

    @api.post("/dm")
    def dm() -> Response:
        cmd: SendDm
        cmd, sender = _post_request(chat, "dm", "to")
        online = stores.presence.is_online(cmd.to)
        if not online and not stores.messages.keeps_dms_for(cmd.to):
            raise ApiError(404, ErrorCode.USER_NOT_FOUND.value, "no such user online")
        draft = draft_dm(cmd.to, sender, SYSTEM_USER, cmd.text, int(clock() * 1000),
                         cmd.client_msg_id)
        try:
            posted = stores.messages.post_dm(SYSTEM_USER, cmd.to, draft,
                                             recipient_online=online)
        except InboxFull as exc:  # the WebSocket path's `inbox_full`: nothing was stored
            raise ApiError(409, ErrorCode.INBOX_FULL.value, str(exc)) from None
        if not posted.duplicate:
            chat.metrics.posted("dm")
            if not online:  # she may have connected since the check, as for a user's dm
                chat.deliver_if_arrived(cmd.to, posted)
        return _reply({"id": posted.msg_id, "to": cmd.to, "duplicate": posted.duplicate,
                       "delivered": online})

    @api.get("/rooms")
    def rooms() -> Response:
        listing = access.store.rooms()
        if listing is None:  # one process: its hub holds every member
            listing = sorted((room, len({s.user_id for s in members}))
                             for room, members in chat.hub.rooms.items())
        return _reply({"rooms": [{"room": room, "users": n, "private": access.is_private(room)}
                                 for room, n in listing]})

    @api.get("/rooms/<room>/users")
    def room_users(room: str) -> Response:
        room = _room_path(chat, room)
        return _reply({"room": room,
                       "users": [m.as_json() for m in stores.rooms.members(room)]})

    @api.get("/rooms/<room>/history")
    def room_history(room: str) -> Response:
        frame: dict[str, Any] = {"type": "history", "room": room,
                                 "limit": _int_arg("limit", 1), "before": _int_arg("before", 1)}
        cmd: History = _parsed(chat, frame)
        # Bounded as the WebSocket `history` reply: the newest that fit in HISTORY_MAX_BYTES,
        # `truncated: true` when older ones within `limit` were left out (page with `before`).
        page = stores.messages.history_page(cmd.room, cmd.limit, cmd.before)
        body: dict[str, Any] = {"room": cmd.room,
                                "messages": [orjson.Fragment(m) for m in page.messages]}
        if page.truncated:
            body["truncated"] = True
        return _reply(body)

    @api.get("/rooms/<room>/members")
    def room_members(room: str) -> Response:
        room = _room_path(chat, room)
        return _reply({"room": room, "private": access.is_private(room),
                       "members": access.store.members(room)})

    @api.post("/rooms/<room>/members")
    def add_member(room: str) -> Response:
        room, user_id = _room_path(chat, room), _user_id(_body())
        changed = access.set_member(room, user_id, True)
        return _reply({"room": room, "user_id": user_id, "member": True, "changed": changed,
                       "private": access.is_private(room)})

    @api.delete("/rooms/<room>/members/<path:user_id>")  # a token's sub may hold "/"
    def remove_member(room: str, user_id: str) -> Response:
        room, user_id = _room_path(chat, room), _lifted_user_id({"user_id": user_id})
        changed = access.set_member(room, user_id, False)
        return _reply({"room": room, "user_id": user_id, "member": False, "changed": changed,
                       "private": access.is_private(room)})

    @api.post("/kick")
    def kick() -> Response:
        body = _body()
        user_id, room = _user_id(body), _room_path(chat, body.get("room"))
        reason = _text_field(body, "reason", 200)
        present = any(m.user_id == user_id for m in stores.rooms.members(room))
        access.kick(room, user_id, reason)
        return _reply({"room": room, "user_id": user_id, "kicked": present})

    @api.post("/ban")
    def ban() -> Response:
        body = _body()
        user_id, room = _user_id(body), _optional_room(chat, body)
        until = until_of(_duration(body), clock())
        access.ban(user_id, room, until, _text_field(body, "reason", 200))
        return _reply({"user_id": user_id, "room": room, "until": until_ms(until)})

    @api.post("/unban")
    def unban() -> Response:
        body = _body()
        user_id, room = _lifted_user_id(body), _optional_room(chat, body)
        return _reply({"user_id": user_id, "room": room, "lifted": access.unban(user_id, room)})

    @api.post("/mute")
    def mute() -> Response:
        body = _body()
        user_id, room = _user_id(body), _optional_room(chat, body)
        until = until_of(_duration(body), clock())
        access.mute(user_id, room, until)
        return _reply({"user_id": user_id, "room": room, "until": until_ms(until)})

    @api.post("/unmute")
    def unmute() -> Response:
        body = _body()
        user_id, room = _lifted_user_id(body), _optional_room(chat, body)
        return _reply({"user_id": user_id, "room": room,
                       "lifted": access.unmute(user_id, room)})

    @api.post("/disconnect")
    def disconnect() -> Response:
        user_id = _user_id(_body())
        closed = access.store.connections(user_id)
        if closed is None:
            closed = len(chat.hub.users.get(user_id, ()))
        access.disconnect(user_id)
        return _reply({"user_id": user_id, "closed": closed})

    @api.get("/info")
    def info() -> Response:
        workers = access.store.workers()
        if workers is None:
            host = socket.gethostname()
            workers = [{"node": f"{host}-{os.getpid()}", "host": host,
                        "connections": len(chat.hub.sessions())}]
        rooms_total, memberships = stores.rooms.totals()
        return _reply({
            "version": __version__, "backend": stores.name,
            "persistence": chat.settings.enable_persistence,
            "pods": len({w["host"] for w in workers}), "workers": workers,
            "connections": sum(w["connections"] for w in workers),
            "rooms": rooms_total, "memberships": memberships,
            "guest_rooms": list(access.guest_rooms),
            "private_rooms": list(access.private_rooms),
        })

    @api.get("/openapi.json")
    def openapi() -> Response:
        return _reply(OPENAPI)

    @api.errorhandler(ApiError)
    def api_error(err: ApiError) -> Response:
        return _error(err.status, err.code, err.message)

    @api.errorhandler(Exception)
    def internal_error(exc: Exception) -> Any:
        if isinstance(exc, HTTPException):
            return _http_error(exc)
        log.exception("API call %s %s failed", request.method, request.path)
        return _error(500, ErrorCode.INTERNAL.value, "internal error")

    @api.errorhandler(Unavailable)
    def unavailable(exc: Unavailable) -> Response:
        chat.log_unavailable(exc)  # as a refused WebSocket request is
        return _error(503, ErrorCode.UNAVAILABLE.value, f"temporarily unavailable ({exc}); retry",
                      {"Retry-After": "1"})

    return api


def register_api(app: Flask, chat: Chat, metrics_port: int,
                 clock: Callable[[], float]) -> None:
    """Mount the API on ``app``: served on ``metrics_port`` only, behind ``API_KEY``."""
    api_key = chat.settings.api_key
    port = str(metrics_port)

    def is_api() -> bool:
        return is_api_path(request.path)

    @app.before_request
    def guard_api() -> Response | None:
        if not is_api():
            return None
        if request.environ.get("SERVER_PORT") != port:
            return _error(404, "not_found", "the API is served on METRICS_PORT")
        if not api_key:
            return _error(403, "api_disabled", "the server API is off: set API_KEY")
        given = request.headers.get("Authorization", "")
        if given[:7].lower() != "bearer " or not hmac.compare_digest(
                given[7:].strip().encode(), api_key.encode()):
            return _error(401, "unauthorized", "Authorization: Bearer <API_KEY> required",
                          {"WWW-Authenticate": 'Bearer realm="wschat-api"'})
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return _error(413, "too_large", f"request bodies are at most {MAX_BODY_BYTES} bytes")
        return None

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        return _http_error(exc) if is_api() else exc  # elsewhere the default page, as before

    app.register_blueprint(create_api(chat, clock))


# -- the OpenAPI document --------------------------------------------------------------

def _schema(required: list[str], **props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


_STR = {"type": "string"}
_ROOM = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$"}
_USER_ID = {"type": "string", "minLength": 1, "maxLength": 128,
            "description": "a user's id: a token's possible sub (no control characters, "
                           "not 'system' or 'api', not beginning with 'guest-') or a "
                           "guest's ('guest-' and 12 hex digits)"}
# What a lift (unban, unmute, a member's removal) takes: also an id an earlier release
# stored something for, before ids were checked.
_LIFTED_USER_ID = {"type": "string", "minLength": 1, "maxLength": 128,
                   "description": "a user's id, or any other an earlier release stored a "
                                  "restriction or membership for"}
_FROM = {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS,
         "description": "display name, printable; default 'system'"}
_REASON = {"type": "string", "minLength": 1, "maxLength": 200, "description": "printable"}
_DURATION = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DURATION,
             "description": "seconds; omitted: until lifted"}
_UNTIL = {"type": ["integer", "null"], "description": "end, Unix ms; null: until lifted"}
_OPTIONAL_ROOM = {**_ROOM, "description": "omitted: everywhere"}
_ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


# Every error status the API answers with: its name under components.responses, the codes
# it carries and when (README: the API's error codes), its headers. Those every call may
# answer are in each operation (_op); those any path may answer (404 for no route, 405,
# 501, gunicorn's refusals) are for no operation: a request no operation takes gets them.
RESPONSES: dict[int, tuple[str, str, dict[str, Any]]] = {
    400: ("BadRequest", ("invalid_json, invalid_request, invalid_room, invalid_message: the "
                         "body or a parameter refused. Any path: bad_request, gunicorn's "
                         "answer to a malformed request line or header"), {}),
    401: ("Unauthorized", "unauthorized: Authorization: Bearer <API_KEY> missing or wrong",
          {"WWW-Authenticate": _header('Bearer realm="wschat-api"')}),
    403: ("Forbidden", ("api_disabled: API_KEY is not configured (every call). Any path: "
                        "forbidden, gunicorn's, only with PROXY-protocol or TLS options "
                        "wschat does not set"), {}),
    404: ("NotFound", ("user_not_found: /api/dm to a user with no connection. Any path: "
                       "not_found, no such path (a room with '/' is none), or /api asked "
                       "on PORT"), {}),
    405: ("MethodNotAllowed", "Any path: method_not_allowed, a method the path does not take",
          {"Allow": _header("the methods the path takes")}),
    409: ("Conflict", "inbox_full: /api/dm, as for users' DMs", {}),
    413: ("RequestEntityTooLarge", (f"too_large: a body (any call's) over {MAX_BODY_BYTES} "
                                    "bytes; message_too_large: a text over MAX_TEXT_CHARS"),
          {}),
    414: ("RequestUriTooLong", ("Any path: uri_too_long, gunicorn's answer to a request "
                                "line over 4094 bytes"), {}),
    417: ("ExpectationFailed", ("Any path: expectation_failed, gunicorn's answer to an "
                                "Expect other than 100-continue"), {}),
    431: ("RequestHeaderFieldsTooLarge", ("Any path: headers_too_large, gunicorn's answer "
                                          "to too many or too large headers"), {}),
    500: ("InternalServerError", ("internal_error: a bug, logged with its traceback; or "
                                  "gunicorn failed on the request before the app saw it"),
          {}),
    501: ("NotImplemented", ("Any path: not_implemented, a method HTTP does not define; "
                             "gunicorn's answer to an unknown Transfer-Encoding"), {}),
    503: ("ServiceUnavailable", "unavailable: Redis or the database is unreachable; retry",
          {"Retry-After": _header("seconds to wait before retrying")}),
}
EVERY_CALL = ("401", "403", "413", "500")  # the guard's, and the handler of any exception


def _response(status: int) -> dict[str, Any]:
    _name, description, headers = RESPONSES[status]
    return {"description": f"{status}: {description}", "content": _ERROR_BODY,
            **({"headers": headers} if headers else {})}


def _op(summary: str, response: dict[str, Any], body: dict[str, Any] | None = None,
        params: list[dict[str, Any]] | None = None, errors: tuple[str, ...] = ()
        ) -> dict[str, Any]:
    """``errors``: the statuses the call answers beyond those every call may (EVERY_CALL:
    401, 403, 413 for a body over MAX_BODY_BYTES, 500); tests/test_contract.py checks them
    against the view's code."""
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "done", "content": {
            "application/json": {"schema": response}}},
            **{status: {"$ref": f"#/components/responses/{RESPONSES[int(status)][0]}"}
               for status in sorted((*EVERY_CALL, *errors))}},
    }
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False,
            "schema": {"type": "integer", "minimum": 1}, "description": description}


_ROOM_PARAM = _path_param("room", _ROOM)
_MUTE_BODY = _schema(["user_id"], user_id=_USER_ID, room=_OPTIONAL_ROOM, duration=_DURATION)
_BAN_BODY = _schema(["user_id"], user_id=_USER_ID, room=_OPTIONAL_ROOM, duration=_DURATION,
                    reason=_REASON)
_LIFT_BODY = _schema(["user_id"], user_id=_LIFTED_USER_ID, room=_OPTIONAL_ROOM)
_RESTRICTED = _schema(["user_id", "room", "until"], user_id=_STR,
                      room={"type": ["string", "null"]}, until=_UNTIL)
_LIFTED = _schema(["user_id", "room", "lifted"], user_id=_STR,
                  room={"type": ["string", "null"]}, lifted={"type": "boolean"})
_MEMBERSHIP = _schema(["room", "user_id", "member", "changed", "private"], room=_STR,
                      user_id=_STR, member={"type": "boolean"}, changed={"type": "boolean"},
                      private={"type": "boolean"})

_STORED = ("503",)  # a call that reads or writes a store (Unavailable: 503)
_CHECKED = ("400", *_STORED)  # one that also checks what it is given

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "wschat server API", "version": __version__,
             "description": "Served on METRICS_PORT (cluster-internal) under /api/; every "
                            "call needs Authorization: Bearer <API_KEY>. Every error is "
                            "{error: {code, message}}; each operation lists the statuses "
                            "it answers. A request no operation takes may get those "
                            "components.responses marks 'Any path': 404 (no such path), "
                            "405 (a method the path does not take; Allow names those it "
                            "does), 501 (a method HTTP does not define), and gunicorn's "
                            "refusals (400, 403, 414, 417, 431, 501). HEAD answers as GET, "
                            "without the body; OPTIONS answers 200 with Allow."},
    "security": [{"apiKey": []}],
    "components": {
        "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Error": _schema(["error"], error=_schema(
            ["code", "message"], code=_STR, message=_STR))},
        "responses": {name: _response(status) for status, (name, _, _) in RESPONSES.items()},
    },
    "paths": {
        "/api/publish": {"post": _op(
            "Post a message to a room as the server (user_id 'system')",
            _schema(["id", "room", "duplicate"], id={"type": "integer"}, room=_STR,
                    duplicate={"type": "boolean"}),
            _schema(["room", "text"], room=_ROOM, text=_STR,
                    **{"from": _FROM},
                    client_msg_id={**_STR, "maxLength": 64}), errors=_CHECKED)},
        "/api/dm": {"post": _op(
            "Send a direct message to a user as the server",
            _schema(["id", "to", "duplicate", "delivered"], id={"type": "integer"}, to=_STR,
                    duplicate={"type": "boolean"}, delivered={"type": "boolean"}),
            _schema(["to", "text"], to=_USER_ID, text=_STR, **{"from": _FROM},
                    client_msg_id={**_STR, "maxLength": 64}),
            errors=(*_CHECKED, "404", "409"))},
        "/api/rooms": {"get": _op(
            "Rooms with members",
            _schema(["rooms"], rooms={"type": "array", "items": _schema(
                ["room", "users", "private"], room=_STR, users={"type": "integer"},
                private={"type": "boolean"})}), errors=_STORED)},
        "/api/rooms/{room}/users": {"get": _op(
            "Users present in a room",
            _schema(["room", "users"], room=_STR, users={"type": "array", "items": _schema(
                ["user_id", "username"], user_id=_STR, username=_STR,
                guest={"type": "boolean", "description": "present (true) for a guest"})}),
            params=[_ROOM_PARAM], errors=_CHECKED)},
        "/api/rooms/{room}/history": {"get": _op(
            "A room's latest messages, oldest first",
            _schema(["room", "messages"], room=_STR,
                    messages={"type": "array", "items": {"type": "object"}},
                    truncated={"type": "boolean", "description":
                               "present (true) when older messages within `limit` were left "
                               "out to keep the reply within 1 MiB; page back with `before`"}),
            params=[_ROOM_PARAM, _query_param("limit", "default 50, at most HISTORY_SIZE"),
                    _query_param("before", "only messages with a smaller id")],
            errors=_CHECKED)},
        "/api/rooms/{room}/members": {
            "get": _op("Users granted membership of a (private) room",
                       _schema(["room", "private", "members"], room=_STR,
                               private={"type": "boolean"},
                               members={"type": "array", "items": _STR}),
                       params=[_ROOM_PARAM], errors=_CHECKED),
            "post": _op("Grant a user membership of a private room", _MEMBERSHIP,
                        _schema(["user_id"], user_id=_USER_ID), params=[_ROOM_PARAM],
                        errors=_CHECKED)},
        "/api/rooms/{room}/members/{user_id}": {"delete": _op(
            "Revoke a membership (the user is removed from the private room at once)",
            _MEMBERSHIP, params=[_ROOM_PARAM, _path_param("user_id", _LIFTED_USER_ID)],
            errors=_CHECKED)},
        "/api/kick": {"post": _op(
            "Remove a user from a room now (they may join again)",
            _schema(["room", "user_id", "kicked"], room=_STR, user_id=_STR,
                    kicked={"type": "boolean", "description": "the user was in the room"}),
            _schema(["room", "user_id"], room=_ROOM, user_id=_USER_ID, reason=_REASON),
            errors=_CHECKED)},
        "/api/ban": {"post": _op("Ban a user from a room or everywhere", _RESTRICTED,
                                 _BAN_BODY, errors=_CHECKED)},
        "/api/unban": {"post": _op("Lift a ban", _LIFTED, _LIFT_BODY, errors=_CHECKED)},
        "/api/mute": {"post": _op("Mute a user in a room or everywhere", _RESTRICTED,
                                  _MUTE_BODY, errors=_CHECKED)},
        "/api/unmute": {"post": _op("Lift a mute", _LIFTED, _LIFT_BODY, errors=_CHECKED)},
        "/api/disconnect": {"post": _op(
            "Close every connection of a user (close code 4003)",
            _schema(["user_id", "closed"], user_id=_STR, closed={"type": "integer"}),
            _schema(["user_id"], user_id=_USER_ID), errors=_CHECKED)},
        "/api/info": {"get": _op(
            "Pods, workers and connections",
            _schema(["version", "backend", "pods", "workers", "connections"], version=_STR,
                    backend=_STR, persistence={"type": "boolean"}, pods={"type": "integer"},
                    workers={"type": "array", "items": _schema(
                        ["node", "host", "connections"], node=_STR, host=_STR,
                        connections={"type": "integer"})},
                    connections={"type": "integer"}, rooms={"type": "integer"},
                    memberships={"type": "integer"},
                    guest_rooms={"type": "array", "items": _STR},
                    private_rooms={"type": "array", "items": _STR}), errors=_STORED)},
        "/api/openapi.json": {"get": _op("This document", {"type": "object"})},
    },
}
