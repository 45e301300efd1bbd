"""The llm-broker's admin operations over HTTP, for holders of the gateway's admin token.

    GET    /admin/entries/{entry_id}   -> llm.admin.lookup
    DELETE /admin/entries/{entry_id}   -> llm.admin.delete
    POST   /admin/flush                -> llm.admin.flush   {"partition" | "namespace" | "user_id": ...}
    POST   /admin/explain              -> llm.admin.explain (a /v1/messages body and its tiermem-* headers)

Why a token of its own: the routes can delete and flush every tenant's entries,
so an API key that may ask questions must not be enough. Without
GATEWAY_ADMIN_TOKEN the routes are not there at all (404); a request without the
`tiermem-admin-token` header gets 401, with a wrong one 403. The gateway's NATS
identity may publish `llm.admin.*` for this reason (`shared.permissions`).
Replies are the broker's JSON as it sent it; errors are in the API's error shape.
"""

from __future__ import annotations

import secrets

import msgspec
import structlog
from aiohttp import web

from shared import metrics, subjects
from shared.contract import encode
from shared.errors import BadRequest, TierError

from . import translate

log = structlog.get_logger()
_raw = msgspec.json.Decoder(msgspec.Raw)
TOKEN_HEADER = "tiermem-admin-token"


class Forbidden(TierError):
    code = 403


class Unauthenticated(TierError):
    code = 401


def add_routes(app: web.Application, gateway, read_json) -> None:
    """Add the routes if the gateway has an admin token (none: they do not exist).
    `read_json(request)`: the gateway's own body reader (its size limit and errors)."""
    token = gateway.rt.settings.gateway_admin_token
    if not token:
        return
    admin = Admin(gateway, token, read_json)
    app.router.add_get("/admin/entries/{entry_id}", admin.lookup)
    app.router.add_delete("/admin/entries/{entry_id}", admin.delete)
    app.router.add_post("/admin/flush", admin.flush)
    app.router.add_post("/admin/explain", admin.explain)


class Admin:
    def __init__(self, gateway, token: str, read_json) -> None:
        self.gateway, self.token, self.read_json = gateway, token, read_json

    async def lookup(self, request: web.Request) -> web.Response:
        return await self._forward(request, "lookup", subjects.LLM_ADMIN_LOOKUP, _entry_id)

    async def delete(self, request: web.Request) -> web.Response:
        return await self._forward(request, "delete", subjects.LLM_ADMIN_DELETE, _entry_id)

    async def flush(self, request: web.Request) -> web.Response:
        async def body(request, _headers):
            asked = await self.read_json(request)
            if not isinstance(asked, dict):
                raise BadRequest("request body must be a JSON object")
            return asked
        return await self._forward(request, "flush", subjects.LLM_ADMIN_FLUSH, body)

    async def explain(self, request: web.Request) -> web.Response:
        """The body and headers of a `/v1/messages` request, translated as that route
        translates them, so the answer is about exactly what the gateway would ask."""
        async def body(request, headers):
            return translate.complete_body(await self.read_json(request), headers).body
        return await self._forward(request, "explain", subjects.LLM_ADMIN_EXPLAIN, body)

    async def _forward(self, request: web.Request, op: str, subject: str, make_body) -> web.Response:
        rid = f"req_tm_{secrets.token_hex(12)}"
        status = 500
        try:
            headers = {k.lower(): v for k, v in request.headers.items()}
            self._check(headers)
            body = await make_body(request, headers)
            reply = await self.gateway._ask(subject, body, _raw)
            status = 200
            return web.Response(body=bytes(reply), content_type="application/json",
                                headers={"request-id": rid})
        except TierError as err:
            status = translate.error_status(err)
            return web.Response(status=status, content_type="application/json",
                                body=encode(translate.error_body(status, err.message, rid)),
                                headers={"request-id": rid})
        except Exception:
            log.exception("http_admin_failed", op=op, request_id=rid)
            return web.Response(status=500, content_type="application/json",
                                body=encode(translate.error_body(500, "internal error", rid)),
                                headers={"request-id": rid})
        finally:
            metrics.gateway_requests.labels(f"admin_{op}", str(status), "none").inc()
            log.info("http_admin", op=op, status=status, request_id=rid)

    def _check(self, headers: dict[str, str]) -> None:
        given = headers.get(TOKEN_HEADER)
        if not given:
            raise Unauthenticated(f"the {TOKEN_HEADER} header is required")
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            raise Forbidden(f"invalid {TOKEN_HEADER}")


async def _entry_id(request: web.Request, _headers) -> dict:
    return {"entry_id": request.match_info["entry_id"]}
