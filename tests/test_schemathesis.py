"""Property-based API testing from the OpenAPI spec: no generated request may cause a
server error (5xx), with and without the admin token."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from serving.api.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings

APP = create_app(make_settings(data_dir=Path(tempfile.mkdtemp(prefix="keywatch-st-"))))
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)


@SCHEMA.parametrize()
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_no_server_error(case: schemathesis.Case) -> None:
    for headers in ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, {}):
        response = case.call(headers=headers)
        assert response.status_code < 500, (case.method, case.path, response.text[:300])
