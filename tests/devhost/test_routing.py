"""Route templates: parameters, constraints, optional and catch-all segments, precedence."""

from __future__ import annotations

import pytest

from devhost.routing import RouteError, RouteTemplate


def test_parameters_and_constraints() -> None:
    route = RouteTemplate.parse("accounts/{id}/messages/{n:int}")
    assert route.match("/accounts/abc/messages/12") == {"id": "abc", "n": "12"}
    assert route.match("/accounts/abc/messages/x") is None
    assert route.match("/accounts/abc/messages") is None
    assert route.match("/accounts/abc/messages/1/extra") is None
    assert route.match("/ACCOUNTS/abc/messages/1") == {"id": "abc", "n": "1"}


def test_optional_default_and_catch_all() -> None:
    assert RouteTemplate.parse("a/{b?}").match("/a") == {}
    assert RouteTemplate.parse("a/{b=zz}").match("/a") == {"b": "zz"}
    assert RouteTemplate.parse("a/{*rest}").match("/a/x/y") == {"rest": "x/y"}
    assert RouteTemplate.parse("a/{*rest}").match("/a") == {}


@pytest.mark.parametrize(("constraint", "good", "bad"), [
    ("guid", "3f2504e0-4f89-11d3-9a0c-0305e82c3301", "nope"),
    ("alpha", "abc", "ab1"),
    ("bool", "true", "yes"),
    ("double", "1.5", "x"),
    ("minlength(3)", "abc", "ab"),
    ("max(10)", "10", "11"),
    ("regex(^a+$)", "aaa", "ab"),
])
def test_constraint_kinds(constraint: str, good: str, bad: str) -> None:
    route = RouteTemplate.parse(f"x/{{v:{constraint}}}")
    assert route.match(f"/x/{good}") == {"v": good}
    assert route.match(f"/x/{bad}") is None


def test_specificity_orders_literals_first() -> None:
    routes = [RouteTemplate.parse(t) for t in ("things/{*rest}", "things/{name}", "things/{id:int}", "things/new")]
    assert [r.template for r in sorted(routes, key=lambda r: r.specificity)] == [
        "things/new", "things/{id:int}", "things/{name}", "things/{*rest}"]


@pytest.mark.parametrize("bad", ["a/{b?}/c", "a/{*b}/c", "a/x{b}", "a//b", "a/{b:unknown}"])
def test_templates_the_devhost_cannot_serve_faithfully_are_refused(bad: str) -> None:
    with pytest.raises(RouteError):
        RouteTemplate.parse(bad)
