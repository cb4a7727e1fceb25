"""Dependencies of both APIs' routes, as `Annotated` aliases (state set up by each `create_app`)."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from shared.config.settings import Settings
from shared.store.containers import ContainerStore
from shared.store.jobs import JobStore
from shared.store.streams import TokenStreams
from shared.store.waiting import JobWaiters


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _store(request: Request) -> ContainerStore:
    return request.app.state.store


def _jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def _celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[ContainerStore, Depends(_store)]
JobsDep = Annotated[JobStore, Depends(_jobs)]
CeleryDep = Annotated[Celery, Depends(_celery)]


def _streams(request: Request) -> TokenStreams:
    return request.app.state.streams


StreamsDep = Annotated[TokenStreams, Depends(_streams)]


def _waiters(request: Request) -> JobWaiters:
    return request.app.state.waiters


WaitersDep = Annotated[JobWaiters, Depends(_waiters)]
