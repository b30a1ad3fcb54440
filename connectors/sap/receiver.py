"""The webhook receiver: the HTTP face of :class:`~connectors.sap.intake.EventIntake`.

``POST <path>`` takes deliveries (after the guard: rate limit, authentication, events cap),
``OPTIONS <path>`` answers the CloudEvents webhook validation handshake, ``GET /healthz``
shows the connector's counters.
"""

from __future__ import annotations

from aiohttp import web

from connectors.sap.intake import EventIntake
from connectors.sap.webhook import WebhookGuard
from connectors.sap.webhook_auth import AuthFailure
from connectors.sap.webhook_limits import retry_after


def web_app(
    intake: EventIntake, path: str = "/events", guard: WebhookGuard | None = None
) -> web.Application:
    """The receiver of ``intake``'s events; ``guard`` (rate limit, authentication, events
    cap) comes before anything of a delivery is parsed, published or dead-lettered."""
    stats = intake.stats

    async def receive(request: web.Request) -> web.Response:
        refused, body = await _admitted(request)
        if refused is not None:
            return refused
        status, answer = await intake.handle_http(
            dict(request.headers),
            body,
            max_events=guard.max_events if guard is not None else None,
        )
        headers = {"Retry-After": "5"} if status == 503 else None
        return web.json_response(answer, status=status, headers=headers)

    async def _admitted(request: web.Request) -> tuple[web.Response | None, bytes]:
        """The guard's refusal (429, 401) of ``request``, or ``None`` and its body. A
        signature-free mode authenticates before the body is read, so a stranger's large
        body is never read."""
        client = request.remote or "unknown"
        if guard is None:
            return None, await request.read()
        wait = guard.admit(client)
        if wait > 0:
            stats.rate_limited += 1
            return web.json_response(
                {"error": "rate_limited"},
                status=429,
                headers={"Retry-After": retry_after(wait)},
            ), b""
        if not guard.needs_body():
            refused = await _authenticate(guard, request, b"", client)
            return refused, (b"" if refused is not None else await request.read())
        body = await request.read()
        return await _authenticate(guard, request, body, client), body

    async def _authenticate(
        guard: WebhookGuard, request: web.Request, body: bytes, client: str
    ) -> web.Response | None:
        try:
            await guard.authenticate(request.headers, body, client)
        except AuthFailure as failure:
            stats.auth_failures += 1
            # Never the reason: it would tell a prober which part of its guess was wrong.
            return web.json_response(
                {"error": "unauthorized"},
                status=401,
                headers={"WWW-Authenticate": failure.challenge},
            )
        return None

    async def handshake(request: web.Request) -> web.Response:
        # The CloudEvents webhook validation handshake (CloudEvents "HTTP 1.1 Web Hooks
        # for Event Delivery", section 4): the sender asks whether it may deliver here.
        # Guarded like a delivery: Event Mesh sends it with the subscription's
        # credentials, and an unauthenticated answer would tell a prober the path is live.
        refused, _ = await _admitted(request)
        if refused is not None:
            return refused
        answer = handshake_headers(
            request.headers.get("WebHook-Request-Origin"),
            guard.security.limits.per_client_rate if guard is not None else None,
        )
        if answer is None:
            return web.json_response(
                {"error": "a validation request names its origin in WebHook-Request-Origin"},
                status=400,
                headers={"Allow": "OPTIONS, POST"},
            )
        return web.Response(status=200, headers=answer)

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **stats.counters()})

    app = web.Application(client_max_size=intake.core.settings.workers.max_message_bytes)
    app.router.add_post(path, receive)
    app.router.add_route("OPTIONS", path, handshake)
    app.router.add_get("/healthz", health)
    return app


_ORIGIN_MAX = 255


def handshake_headers(origin: str | None, rate: float | None) -> dict[str, str] | None:
    """The answer headers to a webhook validation request from ``origin``, or ``None`` when
    it names none (or something that is no host name: it is echoed back, so it must be
    plain). ``rate``: deliveries per second allowed to one sender, announced so that a
    well-behaved sender never meets a 429."""
    if origin is None:
        return None
    origin = origin.strip()
    if not origin or len(origin) > _ORIGIN_MAX or not origin.isascii():
        return None
    if any(not (c.isalnum() or c in ".-_:*[]") for c in origin):
        return None
    headers = {"WebHook-Allowed-Origin": origin, "Allow": "OPTIONS, POST"}
    if rate is not None:
        # Requests per minute, a whole number (the spec's unit); at least 1.
        headers["WebHook-Allowed-Rate"] = str(max(1, int(rate * 60)))
    return headers
