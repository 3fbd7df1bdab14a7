"""/openapi.json is generated from the routes the app serves, so it cannot drift."""

from __future__ import annotations

from starlette.routing import Route
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import parse_settings

CONFIG = """
upstream: {base_url: "http://127.0.0.1:9/v1", token: t}
store: {redis_url: "redis://127.0.0.1:9/0"}
teams: [{name: a, key_sha256: ["%s"]}]
""" % ("a" * 64)


def served_routes(app) -> set[tuple[str, str]]:
    starlette = app
    while not hasattr(starlette, "router"):  # unwrap the ASGI middleware
        starlette = starlette.app
    return {
        (route.path, method.lower())
        for route in starlette.router.routes
        if isinstance(route, Route) and route.path != "/openapi.json"
        for method in route.methods - {"HEAD"}
    }


def test_every_served_route_is_documented_and_nothing_else() -> None:
    app = create_app(parse_settings(CONFIG, environ={}))
    document = TestClient(app).get("/openapi.json").json()
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert documented == served_routes(app)


def test_v1_and_admin_operations_need_a_key_and_ids_have_the_contract_syntax() -> None:
    document = TestClient(create_app(parse_settings(CONFIG, environ={}))).get("/openapi.json")
    for path, operations in document.json()["paths"].items():
        for operation in operations.values():
            assert ("security" in operation) == path.startswith(("/v1", "/admin"))
            for parameter in operation["parameters"]:
                if parameter["in"] == "path":
                    assert parameter["schema"]["pattern"] == "^[A-Za-z0-9_-]{1,128}$"
            assert "400" in operation["responses"]
            assert "200" in operation["responses"]
