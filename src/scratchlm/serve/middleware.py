"""What every request goes through before and after its route: API key, body checks, access log, metrics.

Written as plain ASGI (a function of scope, receive and send) rather than a framework middleware class, so
that it sees the end of a streamed response and never buffers one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
import uuid

from scratchlm.serve.metrics import ServerMetrics
from scratchlm.serve.schemas import error_body

access_log = logging.getLogger("scratchlm.serve.access")

MAX_BODY_BYTES = 8 * 2**20
PUBLIC_PATHS = {"/health"}


def supplied_key(authorization: str) -> str | None:
    """The key in an ``Authorization`` header: ``Bearer KEY`` (API clients) or ``Basic`` with KEY as the
    password (the browser's own login prompt, used by the chat page)."""
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def key_matches(supplied: str | None, expected: str) -> bool:
    """Constant-time comparison. Hashing first makes the time independent of the supplied key's length too."""
    if supplied is None:
        return False
    digest = lambda s: hashlib.sha256(s.encode("utf-8", "surrogatepass")).digest()  # noqa: E731
    return hmac.compare_digest(digest(supplied), digest(expected))


class _BodyTooLarge(Exception):
    pass


class RequestMiddleware:
    """Authenticates, limits bodies, and writes one JSON access-log line and the request metrics."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics, log_prompts: bool = False):
        self.app, self.api_key, self.metrics, self.log_prompts = app, api_key, metrics, log_prompts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["log"] = {}
        status = {"code": 0}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def reply(code: int, body: dict, extra: list[tuple[bytes, bytes]] = ()):
            data = json.dumps(body).encode()
            await send_status({"type": "http.response.start", "status": code, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]})
            await send({"type": "http.response.body", "body": data})

        path, method = scope["path"], scope["method"]
        received = {"bytes": 0}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
                if received["bytes"] > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            return message

        try:
            if self.api_key is not None and path not in PUBLIC_PATHS:
                supplied = supplied_key(headers.get("authorization", ""))
                if not key_matches(supplied, self.api_key):
                    what = "Missing API key" if supplied is None else "Incorrect API key provided"
                    # A browser opening the chat page gets its own login prompt (any user name, the key
                    # as password); API clients are told to send a bearer token.
                    challenge = b'Bearer' if path.startswith("/v1/") else b'Basic realm="scratchlm"'
                    return await reply(401, error_body(f"{what}: send 'Authorization: Bearer <key>'",
                                                       code="invalid_api_key"), [(b"www-authenticate", challenge)])
            if method == "POST":
                content_type = headers.get("content-type", "").split(";")[0].strip().lower()
                # JSON only: browsers cannot send it cross-site without a CORS preflight, which this server
                # never grants, so another web page cannot drive it with the user's browser credentials.
                if content_type != "application/json":
                    return await reply(400, error_body("send the request body as JSON with "
                                                       "'Content-Type: application/json'"))
                length = headers.get("content-length", "0") or "0"
                if not length.isdigit():
                    return await reply(400, error_body("invalid Content-Length header"))
                if int(length) > MAX_BODY_BYTES:
                    return await reply(413, error_body(f"request body larger than {MAX_BODY_BYTES} bytes"))
            await self.app(scope, limited_receive, send_status)
        except _BodyTooLarge:
            if status["code"] == 0:
                await reply(413, error_body(f"request body larger than {MAX_BODY_BYTES} bytes"))
        except Exception:
            status["code"] = status["code"] or 500
            raise
        finally:
            self._log(scope, state["log"], status["code"], started, headers)

    def _log(self, scope, fields: dict, code: int, started: float, headers: dict) -> None:
        route = scope.get("route")
        label = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "other")
        self.metrics.record(self.metrics.requests.inc, 1, label, str(code or 499))
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "id": fields.pop("id", None) or uuid.uuid4().hex[:12],
                "client": scope.get("client", ("-",))[0], "method": scope["method"], "path": scope["path"],
                "status": code or 499,  # 499: the client went away before an answer started (nginx's code)
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "user_agent": headers.get("user-agent", "")[:80]}
        prompt = fields.pop("prompt", None)
        line.update(fields)
        if self.log_prompts and prompt is not None:
            line["prompt"] = prompt
        access_log.info(json.dumps(line, ensure_ascii=False))
