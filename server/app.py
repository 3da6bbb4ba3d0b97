"""create_app(settings): the gateway. State lives on app.state, built in the lifespan; no module globals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from server.batch.runner import BatchRunner
from server.desired import desired_models, unserved_models
from server.errors import ModelNotVerified, document_errors, install_error_handlers
from server.ops.auth import KeyChecker
from server.ops.fallback import FallbackMiddleware
from server.ops.gateway import GatewayMiddleware
from server.ops.keys import KeyRing
from server.ops.metrics import Metrics
from server.ops.replay import ReplayMiddleware
from server.registry import Registry
from server.settings import Settings
from server.state import open_state
from server.watch import ManifestWatcher

log = logging.getLogger("hubserve.app")


def create_app(settings: Settings, registry: Registry | None = None, start_engines: bool = True) -> FastAPI:
    """The FastAPI app. ``registry``: engines to serve (default: every model of the manifest, verified in
    the store). Engines start in the background, so /health and /ready answer while they load."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if app.state.registry is None:
            app.state.registry = build_registry(settings)
        registry: Registry = app.state.registry
        watcher = app.state.watcher = ManifestWatcher(settings, registry) if start_engines and settings.watch else None
        starting = asyncio.create_task(_boot(registry, watcher), name="start-engines") if start_engines else None
        if starting is not None:
            starting.add_done_callback(_report_start_failure)
        app.state.batches.start()
        try:
            yield
        finally:
            await app.state.batches.stop()
            if starting is not None:
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await starting
            if watcher is not None:
                await watcher.stop()
            await registry.stop_all()
            await app.state.state.close()

    # the docs routes are server/ops/routes.py's docs_router: closed like the API once keys exist
    app = FastAPI(title="hubserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.settings = settings
    app.state.registry = registry
    app.state.watcher = None
    app.state.started = time.time()
    # budgets, usage, idempotency records, the response cache, batch jobs (server/state/): SQLite or Redis
    app.state.state = open_state(settings.state_url, settings.state_path())
    app.state.batches = BatchRunner(app, app.state.state, settings)  # /v1/files, /v1/batches; runs in the lifespan
    app.state.key_checker = KeyChecker(settings.all_key_digests(), KeyRing(settings.keys_path()),
                                       reserve=settings.max_new_tokens, lease_s=settings.key_lease_s)
    metrics = Metrics()
    metrics.watch_engines(lambda: app.state.registry)
    app.state.metrics = metrics
    app.add_middleware(FallbackMiddleware, metrics=metrics)  # inside the gateway's: an alias's models, in order
    app.add_middleware(ReplayMiddleware, settings=settings, metrics=metrics)  # outside it: one record per request
    app.add_middleware(GatewayMiddleware, settings=settings, metrics=metrics)
    install_error_handlers(app)
    _include_routers(app)
    document_errors(app)
    return app


def build_registry(settings: Settings) -> Registry:
    """The registry of every model of the manifest verified in the store. Unless ``wait_for_sync``, a model
    that is not verified yet is an error (ModelNotVerified names it); otherwise it is served once it is."""
    from sync.manifest import load_config

    config = load_config(settings.config, settings.store)
    desired = desired_models(config)
    missing = unserved_models(config, desired)
    if missing and not settings.wait_for_sync:
        raise ModelNotVerified(missing[0])
    for reason in desired.waiting.values():
        log.warning("%s (waiting for it)", reason)
    return Registry.from_desired(desired, settings)


async def _boot(registry: Registry, watcher: ManifestWatcher | None) -> None:
    """Start the engines, then follow the manifest, lock and store (first reload at once: catch up)."""
    await registry.start_all()
    if watcher is not None:
        watcher.start()
        watcher.trigger()


def _report_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("starting the engines failed: %s", task.exception())


def _include_routers(app: FastAPI) -> None:
    """Every family's routers. Each lists Depends(family_dependency(Family.X)) then Depends(require_api_key).
    Order matters: the Hub family's ``POST /models/{repo_id:path}`` would swallow the other families'
    ``/models/{repo_id}/...`` routes, so it comes last. Families import none of each other: what one lends
    another (TGI's text generation to the Hub routes) is handed over here, on app.state."""
    from server.anthropic import routes as anthropic
    from server.batch import routes as batch
    from server.hub import routes as hub
    from server.openai import routes as openai
    from server.ops.admin import router as admin_router
    from server.ops.routes import docs_router
    from server.ops.routes import router as ops_router
    from server.tgi import routes as tgi
    from server.tgi.serving import hub_text_generation

    app.state.text_generation = hub_text_generation
    for router in (ops_router, docs_router, admin_router, anthropic.router, anthropic.model_router, batch.router,
                   openai.router, openai.model_router, openai.root_router, tgi.router, hub.router, hub.root_router):
        app.include_router(router)
