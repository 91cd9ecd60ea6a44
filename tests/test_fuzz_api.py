"""The JSON API fuzzed from its own OpenAPI document (schemathesis, in-process against the ASGI
app, with an operator's token): whatever a request holds, no answer is a 5xx, and every answer
is one the document declares for its operation. On SQLite and PostgreSQL, with a device, its
records and a driver's wallet in the database, so that some requests find something.

``ODO_FUZZ_LONG=1`` runs many more examples per operation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from starlette.applications import Starlette

from backend.db import Database
from backend.ledger import assignments
from backend.records import store
from backend.web import openapi
from backend.web.app import create_app
from backend.web.context import AppContext
from sim.devices import T0, Dongle, batch, enroll
from tests import fuzz_support
from tests.fuzz_support import LONG, count

TOKEN = "operator-token-for-the-api-fuzz"
NOW = T0 + 86_400_000
EXAMPLES = 400 if LONG else 25

schema = schemathesis.openapi.from_dict(openapi.document())


@pytest.fixture(scope="module", autouse=True)
def _cases(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from fuzz_support.report(request, "api ")


@dataclass(frozen=True)
class Api:
    app: Starlette
    known: dict[str, str]          # path parameters that name what the database holds


@pytest.fixture
def api(db: Database, rules: Any) -> Api:
    """The app on ``db``, holding a device with a few records and an assigned driver."""
    d = Dongle()
    enroll(db, d)
    store.process_batch(db, rules, d.dev, batch(d.odometer(1), d.trip(12), d.odometer(1)), NOW)
    with db.write() as tx:
        tx.execute("INSERT INTO drivers (id, name, created_at) VALUES (?, ?, ?)", ("alice", "Alice", T0))
    assert d.vin is not None
    assignments.assign(db, "alice", d.vin, T0, NOW)
    app = create_app(AppContext(db=db, rules=rules, api_token=TOKEN, clock=lambda: NOW))
    return Api(app, {"dev": d.dev, "vin": d.vin, "id": "alice", "account": "driver:alice"})


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_no_request_gets_a_server_error(case: Any, api: Api) -> None:
    # Every other case asks about what the database holds, with the rest of the request as drawn.
    params = case.path_parameters or {}
    if params and sum(fuzz_support.COUNTS.values()) % 2:
        params.update({k: v for k, v in api.known.items() if k in params})
    response = case.call(app=api.app, headers={"Authorization": f"Bearer {TOKEN}"})
    count(f"api requests answered {response.status_code // 100}xx")
    assert response.status_code < 500, (response.status_code, response.text[:500])
    case.validate_response(response, checks=[schemathesis.checks.not_a_server_error,
                                             schemathesis.checks.status_code_conformance,
                                             schemathesis.checks.response_schema_conformance,
                                             schemathesis.checks.content_type_conformance])
