"""The task vocabulary lives in one table (server/tasks/catalog.py); every other list of tasks agrees with it."""

from __future__ import annotations

import pytest

from server.engines.worker.media import TASK_MODULES
from server.tasks.catalog import MEDIA_TASKS, NOT_SERVED, TASKS, task_timeout_s
from server.tasks.media_requests import MEDIA_REQUESTS
from server.tasks.requests import TASK_REQUESTS
from sync.errors import ConfigError
from sync.manifest import TASKS as MANIFEST_TASKS
from sync.manifest import parse_manifest

pytestmark = pytest.mark.unit


def test_every_list_of_tasks_agrees_with_the_catalog() -> None:
    assert set(MANIFEST_TASKS) <= set(TASKS)
    assert set(MANIFEST_TASKS) >= MEDIA_TASKS
    assert set(TASK_MODULES) == set(MEDIA_REQUESTS) == MEDIA_TASKS
    assert set(TASK_REQUESTS) <= set(TASKS) and all(TASKS[t].expects for t in TASK_REQUESTS | MEDIA_REQUESTS)
    assert not set(NOT_SERVED) & set(TASKS)


def test_default_timeouts_by_kind_of_work() -> None:
    assert task_timeout_s("text-classification", 600) == task_timeout_s("feature-extraction", 600) == 60
    assert task_timeout_s("text-generation", 123) == 123
    assert task_timeout_s("image-classification", 600) == task_timeout_s("automatic-speech-recognition", 600) == 900


@pytest.mark.parametrize("task", sorted(NOT_SERVED))
def test_models_toml_refuses_unserved_tasks_with_the_reason(task: str) -> None:
    text = f'[[models]]\nname = "m"\nrepo = "org/m"\nrevision = "{"a" * 40}"\ntask = "{task}"\n'
    with pytest.raises(ConfigError, match=f"'{task}' is not served: "):
        parse_manifest(text, "models.toml")
