"""Served name / repo id → engine, and admission of requests (waiting through a load or an in-place swap).

API (what serving code uses)::

    engine = registry.get(name_or_repo)   # Engine serving it (an adapter's view for an adapter); None → default
    slot = await registry.admit(engine)   # loads the model if needed, waits (bounded) through an in-place swap,
    slot.engine.client()...               #   then takes a slot: after a swap slot.engine is the new revision's
    slot.release()                        # (or ``with slot:``)
    registry.engines                      # dict: served name → Engine, in manifest order
    registry.ready                        # every model loaded at startup is served by a ready engine

An alias (``[[aliases]]``) names models tried in order: the fallback middleware (server/ops/fallback.py) tries each
through ``get``; a key may use an alias's models through it when it may use the alias (``registry.aliases``).
What should be served comes from server/desired.py; starting, loading, evicting and swapping engines is
server/lifecycle.py's (``registry.apply(desired)``, ``start_all``, ``stop_all`` hand over to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable

from server.desired import Desired
from server.engines.base import AdapterInfo, Admission, Engine, EngineState, ModelInfo
from server.errors import EngineUnavailable, InvalidRequest, ModelNotFound, Overloaded, ServerError
from server.lifecycle import GIB, Lifecycle, available_memory
from server.ops.auth import authorize, may_use_names
from server.ops.context import bound_time, current, note_answerer, note_queue
from server.ops.fallback import current_attempt, note_refusal
from server.ops.replay import model_resolved
from server.served import UNLOADED, ServedModel
from server.settings import Settings
from server.tasks.catalog import task_timeout_s
from sync.manifest import AliasSpec

log = logging.getLogger("hubserve.registry")

EngineFactory = Callable[[ModelInfo, Settings], Engine]


class Registry:
    """The engines of one server, by served name, with lookup by repo id and a default model."""

    def __init__(
        self,
        engines: Iterable[Engine],
        memory_budget: int | None = None,
        max_parallel: int = 0,
        settings: Settings | None = None,
        factory: EngineFactory | None = None,
        adapters: dict[str, list[AdapterInfo]] | None = None,
    ) -> None:
        self._served: dict[str, ServedModel] = {}
        for engine in engines:
            if engine.info.name in self._served:
                raise ValueError(f"two engines serve the name {engine.info.name!r}")
            self._served[engine.info.name] = ServedModel(engine, (adapters or {}).get(engine.info.name))
        self.memory_budget = memory_budget
        self.max_parallel = max_parallel
        self.settings = settings or Settings()
        self._factory = factory
        self.waiting: dict[str, str] = {}  # manifest models not servable yet, with the reason
        self.pending: dict[str, str] = {}  # served models whose new pin is not verified yet
        self.aliases: dict[str, AliasSpec] = {}  # alias name → its models, tried in order (server/ops/fallback.py)
        self.lifecycle = Lifecycle(self)

    @classmethod
    def from_models(
        cls, models: list[ModelInfo], settings: Settings, factory: EngineFactory | None = None,
        adapters: dict[str, list[AdapterInfo]] | None = None,
    ) -> Registry:
        if factory is None:
            from server.engines.select import make_engine

            factory = make_engine
        engines = [factory(m, settings) for m in models]
        max_parallel = settings.max_parallel_starts
        if not max_parallel and any(e.device == "gpu" for e in engines):
            max_parallel = 1  # vLLM sizes its KV cache from free GPU memory at start: concurrent starts race
        budget = int(settings.memory_budget_gib * GIB) if settings.memory_budget_gib else available_memory()
        return cls(engines, memory_budget=budget, max_parallel=max_parallel, settings=settings, factory=factory,
                   adapters=adapters)

    @classmethod
    def from_desired(cls, desired: Desired, settings: Settings, factory: EngineFactory | None = None) -> Registry:
        registry = cls.from_models(desired.models, settings, factory, desired.adapters)
        registry.waiting, registry.pending = dict(desired.waiting), dict(desired.pending)
        registry.aliases = dict(desired.aliases)
        return registry

    # ---- lookup -------------------------------------------------------------------------------------
    @property
    def engines(self) -> dict[str, Engine]:
        """Served name → the engine serving it now, in manifest order."""
        return {name: served.engine for name, served in self._served.items()}

    @property
    def served(self) -> dict[str, ServedModel]:
        return dict(self._served)

    def names(self) -> list[str]:
        """Served names of every model and adapter."""
        return [n for s in self._served.values() for n in (s.info.name, *(a.name for a in s.adapters))]

    def adapters(self) -> list[tuple[ServedModel, AdapterInfo]]:
        return [(s, a) for s in self._served.values() for a in s.adapters]

    def _find(self, name_or_repo: str) -> tuple[ServedModel, AdapterInfo | None] | None:
        served = self._served.get(name_or_repo)
        if served is not None:
            return served, None
        by_repo = [s for s in self._served.values() if s.info.repo == name_or_repo]
        served = next((s for s in by_repo if s.info.default), by_repo[0] if by_repo else None)
        if served is not None:  # a repo served twice resolves to its default, else the first
            return served, None
        for base, adapter in self.adapters():
            if name_or_repo in adapter.served_names:
                return base, adapter
        return None

    def _lookup(self, name_or_repo: str | None) -> tuple[ServedModel, AdapterInfo | None, Engine]:
        """The served model, the adapter (None: the model itself) and the engine (or adapter view) a name means,
        once the request's key may use it; its time limit bounds the request from here."""
        if not name_or_repo:
            engine = self.default()
            return self._served[engine.info.name], None, engine
        granted, name_or_repo = self._through_alias(name_or_repo)
        found = self._find(name_or_repo)
        if found is None and name_or_repo in self.waiting and (granted or may_use_names((name_or_repo,))):
            raise EngineUnavailable(
                f"Model `{name_or_repo}` is not loaded yet: {self.waiting[name_or_repo]}; retry later.",
                retry_after=self.settings.retry_after_s,
            )
        if found is None:
            raise ModelNotFound(name_or_repo, [*self.names(), *self.aliases])
        served, adapter = found
        engine = served.engine if adapter is None else self.get_adapter(served, adapter)
        ctx = current()
        if granted and ctx is not None:  # granted through the alias: label the answer as authorize does
            ctx.model, ctx.commit = engine.info.name, engine.info.commit
        else:
            authorize(engine.info)  # the request's key may use this model (404 otherwise); every family comes here
        bound_time(self.timeout_s(served.info))  # the model's time limit replaces the server's
        return served, adapter, engine

    def _through_alias(self, name: str) -> tuple[bool, str]:
        """(whether the key may use the model through an alias, the model name to look up), once the request's key
        may use the alias (404 otherwise, as for an unknown model). Through the fallback middleware's attempt, the
        name is its candidate and the alias grants it. An alias named with no attempt under way (a multipart body, an
        in-process caller) means its first model, without fallback and without a grant: the key must be allowed that
        model as well (no state outlives the attempt, so a grant can never leak to a later lookup)."""
        attempt = current_attempt()
        alias = self.aliases.get(attempt.alias) if attempt is not None and name == attempt.candidate else None
        granted = alias is not None
        if alias is None:
            alias = self.aliases.get(name)
            if alias is None:
                return False, name
            name = alias.models[0]
        if not may_use_names((alias.name,)):
            raise ModelNotFound(alias.name, [*self.names(), *self.aliases])
        return granted, name

    def adapter_of(self, base: Engine, adapter_id: str) -> Engine:
        """The adapter ``adapter_id`` (served name or repo id) of the model ``base`` serves (TGI's adapter_id);
        InvalidRequest naming the model's adapters when it has no such adapter."""
        served = self._served.get(base.info.name)
        adapters = served.adapters if served is not None else []
        adapter = next((a for a in adapters if adapter_id in a.served_names), None)
        if served is None or adapter is None:
            known = ", ".join(a.name for a in adapters) or "none"
            raise InvalidRequest(f"`adapter_id` {adapter_id!r} is not an adapter of model `{base.info.name}` "
                                 f"(its adapters: {known}).", param="adapter_id")
        view = self.get_adapter(served, adapter)
        authorize(view.info)
        return view

    def timeout_s(self, info: ModelInfo) -> float:
        """How long one request to ``info`` may take: its ``timeout_s``, else its task kind's default."""
        return info.timeout_s or task_timeout_s(info.task, self.settings.request_timeout_s)

    def get(self, name_or_repo: str | None) -> Engine:
        """The engine serving ``name_or_repo`` (served name first, then repo id, then adapters); None →
        ``default()``. For an adapter, its view on the base engine (loaded or not yet)."""
        return self._lookup(name_or_repo)[2]

    @staticmethod
    def get_adapter(served: ServedModel, adapter: AdapterInfo) -> Engine:
        """The engine view of ``adapter`` on ``served``: the loaded one, or (not loaded yet) a new view; admission
        then loads the base and the adapter, and hands out the current view."""
        view = served.engine.adapter(adapter.name)
        if view is not None and view.info.commit == adapter.commit:
            return view
        from server.engines.adapter import AdapterEngine

        return AdapterEngine(served.engine, adapter)

    def default(self) -> Engine:
        for served in self._served.values():
            if served.info.default:
                authorize(served.info)
                return served.engine
        if len(self._served) == 1:
            return self._lookup(next(iter(self._served)))[2]
        visible = [n for n in self.names() if may_use_names((n,))]  # a restricted key learns only its own models
        raise InvalidRequest(
            f"This server serves several models and none is the default; name one of: {', '.join(visible)}.",
            param="model",
        )

    @property
    def ready(self) -> bool:
        """Every model loaded at startup is ready; an on-demand or idle-unloaded model being unloaded is fine."""
        return (
            bool(self._served)
            and not self.waiting
            and all(s.held or s.engine.state is EngineState.READY or (s.unloadable and (
                s.engine.state in UNLOADED or s.engine.state is EngineState.STARTING)) for s in self._served.values())
        )

    def reorder(self, order: list[str]) -> None:
        rank = {name: i for i, name in enumerate(order)}
        self._served = dict(sorted(self._served.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    def new_engine(self, info: ModelInfo) -> Engine:
        if self._factory is None:
            from server.engines.select import make_engine

            self._factory = make_engine
        return self._factory(info, self.settings)

    # ---- admission ----------------------------------------------------------------------------------
    def _load_patience(self, info: ModelInfo) -> float:
        """How long this request waits for ``info`` to load: the model's load timeout, or less if the client's
        X-Scale-Up-Timeout says so."""
        patience = self.lifecycle.load_timeout_s(info)
        ctx = current()
        if ctx is not None and ctx.scale_up_timeout_s is not None:
            patience = min(patience, ctx.scale_up_timeout_s)
        return patience

    async def admit(self, engine_or_name: Engine | str | None) -> Admission:
        """A slot on the engine serving that model now.

        A model that is not loaded is loaded first (the request waits at most its load timeout, or the client's
        X-Scale-Up-Timeout; then 503 ModelLoading with Retry-After and the estimated time). During an in-place swap
        the request waits (at most ``swap_wait_timeout_s``, with at most ``max_queued_requests`` waiting); at the
        in-flight limit it waits ``queue_timeout_s`` (0: not at all). Then Overloaded (429). An engine that is
        down answers EngineUnavailable (503) at once.
        """
        try:
            return await self._admit(engine_or_name)
        except ServerError as e:  # why this model did not answer, for an alias's fallback (server/ops/fallback.py)
            note_refusal(e)
            raise

    async def _admit(self, engine_or_name: Engine | str | None) -> Admission:
        """``admit`` without noting its refusal."""
        name = engine_or_name.info.name if isinstance(engine_or_name, Engine) else engine_or_name
        served, adapter, view = self._lookup(name)
        await model_resolved(view)  # an Idempotency-Key replay or a cache hit, once the key may use it (ops/replay.py)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        entered = loop.time()
        while True:
            engine = served.engine
            if served.unloading:  # wait for the unload to end, then load it again
                if not await served.wait(self._load_patience(served.info)):
                    raise self.lifecycle.loading_error(served)
                self._check_still_served(served)
                continue
            if not served.held:
                if served.loading is not None or (engine.state in UNLOADED and served.unloadable):
                    if served.load_waiters >= self.settings.max_queued_requests:
                        raise Overloaded(f"Model `{engine.info.name}` is loading and {served.load_waiters} requests "
                                         "wait for it; retry later.", retry_after=engine.retry_after_s)
                    await self.lifecycle.wait_loaded(served, self._load_patience(served.info))
                    self._check_still_served(served)
                    continue
                if engine.state is not EngineState.READY:
                    raise engine.unavailable()
                if engine.in_flight < engine.max_in_flight:
                    note_queue(loop.time() - entered)  # for the request's log line and the queue histogram
                    slot = self._take(served, adapter)
                    note_answerer(slot.engine.info)  # after waiting through a swap: the new revision answers
                    return slot
            attempt = current_attempt()  # an alias's model that is not its last: full is full, the next one answers
            queue = 0.0 if attempt is not None and not attempt.may_queue else self.settings.queue_timeout_s
            patience = self.settings.swap_wait_timeout_s if served.held else queue
            if deadline is None:
                deadline = loop.time() + patience
            remaining = deadline - loop.time()
            if remaining <= 0 or served.queued >= self.settings.max_queued_requests:
                raise Overloaded(
                    f"Model `{engine.info.name}` "
                    + ("is swapping to a new revision" if served.held else f"has {engine.in_flight} requests in flight")
                    + f" and {served.queued} waiting; retry later.",
                    retry_after=engine.retry_after_s,
                )
            await served.wait(remaining)
            self._check_still_served(served)

    def _check_still_served(self, served: ServedModel) -> None:
        if served is not self._served.get(served.info.name):  # removed while we waited
            raise ModelNotFound(served.info.name, self.names())

    @staticmethod
    def _take(served: ServedModel, adapter: AdapterInfo | None) -> Admission:
        if adapter is None:
            return served.engine.admit()
        view = served.engine.adapter(adapter.name)
        if view is None:
            reason = (served.rollout or {}).get("adapters_error") or "it is not loaded into its base model's engine"
            raise EngineUnavailable(f"Adapter `{adapter.name}` is unavailable: {reason}; retry later.",
                                    retry_after=served.engine.retry_after_s)
        return view.admit()  # the adapter's current revision (after a move: the new one)

    @contextlib.asynccontextmanager
    async def using(self, engine_or_name: Engine | str | None) -> AsyncIterator[Engine]:
        """``async with registry.using(engine) as engine:`` admits a request and releases its slot at the end."""
        slot = await self.admit(engine_or_name)
        try:
            yield slot.engine
        finally:
            slot.release()

    # ---- lifecycle (server/lifecycle.py) --------------------------------------------------------------
    async def start_all(self) -> None:
        await self.lifecycle.start_all()

    async def stop_all(self) -> None:
        await self.lifecycle.stop_all()

    async def apply(self, desired: Desired | list[ModelInfo]) -> None:
        if not isinstance(desired, Desired):
            desired = Desired(desired, {}, {}, aliases=self.aliases)
        self.aliases = dict(desired.aliases)  # an alias edit applies at once (the watcher's reload)
        await self.lifecycle.apply(desired)

    def forget_failures(self) -> None:
        self.lifecycle.forget_failures()

    def waiting_for(self, name_or_repo: str | None) -> int:
        """How many requests wait for a slot on, or the load of, the model ``name_or_repo`` means (None: the
        default); 0 when it names none. Read-only, no key check: batch lines start only while this is 0."""
        found = self._find(name_or_repo) if name_or_repo else None
        served = found[0] if found is not None else None
        if not name_or_repo:
            served = next((s for s in self._served.values() if s.info.default), None)
            if served is None and len(self._served) == 1:
                served = next(iter(self._served.values()))
        return 0 if served is None else served.queued + served.load_waiters
