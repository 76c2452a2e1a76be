"""Declarative apply (`trigger-service plan|diff|apply|export`) against a real service, over NATS and
over HTTP: plans, applies, re-applies that change nothing, prune of owned triggers only, a change
made between the plan and the apply, export round trips, exit codes and bad files."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.aio.client import Client

from service import apply, manifest
from service.client import connect
from service.natsserver import NatsServer
from tests import http_fixtures
from tests.support import PREFIX, gateway_request, request, stream_request, token, unique

gateway_url, http = http_fixtures.gateway_url, http_fixtures.http

pytestmark = pytest.mark.usefixtures("service")


class Result:
    """What one run of the command line left: exit code, standard output and standard error."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out!r}, err={self.err!r})"


class Tty(io.StringIO):
    """Standard input that is a terminal: `answer` is what the user types, after `before` ran."""

    def __init__(self, answer: str, before: Any = None) -> None:
        super().__init__()
        self.answer, self.before, self.asked = answer, before, False

    def isatty(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> str:
        self.asked = True
        if self.before is not None:
            self.before()  # runs in the thread apply reads from: the service's loop goes on
        return self.answer


class Cli:
    """The command line for one account, over one transport."""

    def __init__(self, transport: list[str], account: str) -> None:
        self.transport = transport
        self.account = account

    async def __call__(self, *args: str, stdin: io.StringIO | None = None, **env: str) -> Result:
        out, err = io.StringIO(), io.StringIO()
        argv = [*args, *self.transport, "--token", token(self.account)]
        code = await apply.run(argv, stdout=out, stderr=err, stdin=stdin or io.StringIO(), environ=env)
        return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(params=["nats", "http"])
def transport(request: pytest.FixtureRequest, nats_server: NatsServer) -> list[str]:
    """The command line's transport options: NATS to the test's service, or HTTP to a sidecar."""
    if request.param == "nats":
        return ["--nats-url", nats_server.url, "--prefix", PREFIX]
    return ["--url", request.getfixturevalue("gateway_url")]


@pytest.fixture
def account() -> str:
    """A fresh account, so that every test sees only its own triggers."""
    return unique("acct")


@pytest.fixture
def cli(transport: list[str], account: str) -> Cli:
    return Cli(transport, account)


@pytest.fixture
def nats_cli(nats_server: NatsServer, account: str) -> Cli:
    """The command line over NATS only."""
    return Cli(["--nats-url", nats_server.url, "--prefix", PREFIX], account)


def write(path: Path, document: Any) -> str:
    """Write a triggers file (YAML for .yaml/.yml, else JSON) and return its name."""
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    else:
        path.write_text(json.dumps(document))
    return str(path)


async def get(nc: Client, account: str, trigger_type: str, name: str) -> Any:
    reply = await request(nc, f"{PREFIX}.get.{trigger_type}.{name}", account=account)
    return reply.body if reply.status == 200 else reply.status


async def names(nc: Client, account: str) -> set[str]:
    reply = await request(nc, f"{PREFIX}.list", {"subject_pattern": f"{PREFIX}.>"}, account=account)
    assert reply.status == 200, reply.envelope
    return {f"{r['trigger_type']}/{r['name']}" for r in reply.body["results"]}


async def create(nc: Client, account: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await request(nc, f"{PREFIX}.create.{body['trigger_type']}", body, account=account)
    assert reply.status == 201, reply.envelope
    return reply.body


def shop(owner: str | None = "shop", **changes: Any) -> dict[str, Any]:
    """A file of one stream and one gateway trigger; the path is not in canonical form and the
    defaults the service fills in (`timeout`, `is_public`, `enabled`) are left out."""
    gateway = gateway_request("api", "POST", f"/{unique('shop')}/./orders")
    gateway["description"] = "orders API"
    gateway["gateway_mapping"].update(changes.pop("mapping", {}))
    gateway.update(changes.pop("gateway", {}))
    stream = {
        "name": "orders",
        "trigger_type": "stream",
        "source": {"subject": f"{unique('shop')}.orders"},
        "target": {"subject": f"{unique('audit')}.orders"},
    }
    document: dict[str, Any] = {"triggers": [stream, gateway]}
    if owner is not None:
        document["owner"] = owner
    return document


# --- plan, apply, apply again ----------------------------------------------------------------


async def test_plan_then_apply_creates_and_a_second_apply_changes_nothing(
    cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    path = write(tmp_path / "triggers.yaml", shop())

    planned = await cli("plan", "-f", path)
    assert planned.code == apply.CHANGES, planned
    assert planned.lines == [
        "+ create stream/orders",
        "+ create gateway/api",
        "Plan: 2 to create, 0 to update, 0 to delete.",
    ]
    assert await names(nc, account) == set(), "plan changes nothing"

    applied = await cli("apply", "-f", path, "--yes")
    assert applied.code == apply.CHANGES, applied
    assert "  created stream/orders (revision " in applied.out
    assert applied.lines[-1] == "Applied: 2 created, 0 updated, 0 deleted."
    record = await get(nc, account, "gateway", "api")
    assert record["collection"] == "shop", "apply tags what it creates with the owner"
    assert record["gateway_mapping"]["path"].endswith("/orders")
    assert "/./" not in record["gateway_mapping"]["path"]  # stored canonical: no phantom diff below

    again = await cli("apply", "-f", path, "--yes")
    assert again.code == apply.NO_CHANGES, again
    assert again.lines == [f"No changes: the live triggers match {path}."]
    assert (await cli("diff", "-f", path)).code == apply.NO_CHANGES


async def test_json_file_and_file_without_owner_keep_the_collection_as_given(
    cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    document = shop(owner=None)
    document["triggers"][0]["collection"] = "analytics"
    path = write(tmp_path / "triggers.json", document)
    assert (await cli("apply", "-f", path, "--yes")).code == apply.CHANGES
    assert (await get(nc, account, "stream", "orders"))["collection"] == "analytics"
    assert "collection" not in await get(nc, account, "gateway", "api")
    assert (await cli("plan", "-f", path)).code == apply.NO_CHANGES


async def test_a_trigger_created_by_hand_with_the_same_configuration_plans_only_its_owner_tag(
    nats_cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    """Defaults the service stored (timeout 30000, is_public false, enabled) are no difference."""
    document = shop()
    for body in document["triggers"]:
        await create(nc, account, body)
    path = write(tmp_path / "triggers.yaml", document)
    planned = await nats_cli("plan", "-f", path)
    assert planned.code == apply.CHANGES
    assert planned.lines[:2] == [
        '~ update stream/orders: collection null -> "shop"',
        '~ update gateway/api: collection null -> "shop"',
    ]


# --- updates ---------------------------------------------------------------------------------


async def test_a_changed_field_is_planned_as_a_field_diff_and_applied_with_its_revision(
    cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    document = shop()
    path = write(tmp_path / "triggers.yaml", document)
    assert (await cli("apply", "-f", path, "--yes")).code == apply.CHANGES
    before = await get(nc, account, "gateway", "api")

    document["triggers"][1]["gateway_mapping"]["timeout"] = 5000
    write(tmp_path / "triggers.yaml", document)
    planned = await cli("plan", "-f", path)
    assert planned.code == apply.CHANGES, planned
    assert planned.lines == [
        "~ update gateway/api: gateway_mapping.timeout 30000 -> 5000",
        "Plan: 0 to create, 1 to update, 0 to delete.",
    ]

    applied = await cli("apply", "-f", path, "--yes")
    assert applied.code == apply.CHANGES, applied
    after = await get(nc, account, "gateway", "api")
    assert after["gateway_mapping"]["timeout"] == 5000
    assert after["type"] == "updated"
    assert after["revision"] > before["revision"]
    assert f"  updated gateway/api (revision {after['revision']})" in applied.lines
    assert applied.lines[-1] == "Applied: 0 created, 1 updated, 0 deleted."
    assert (await cli("apply", "-f", path, "--yes")).code == apply.NO_CHANGES


async def test_nested_and_several_fields_are_one_line_and_enabled_false_disables(
    nats_cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    document = shop()
    path = write(tmp_path / "triggers.yaml", document)
    assert (await nats_cli("apply", "-f", path, "--yes")).code == apply.CHANGES

    document["triggers"][1]["gateway_mapping"]["limit"] = {"request": 10, "time": 1000}
    document["triggers"][1]["description"] = "orders API, limited"
    document["triggers"][0]["enabled"] = False
    document["triggers"][0]["source"]["type"] = "stream"
    write(tmp_path / "triggers.yaml", document)
    planned = await nats_cli("plan", "-f", path)
    assert planned.lines[:2] == [
        '~ update stream/orders: source.type null -> "stream", enabled true -> false',
        '~ update gateway/api: gateway_mapping.limit null -> {"request":10,"time":1000}, '
        'description "orders API" -> "orders API, limited"',
    ]
    assert (await nats_cli("apply", "-f", path, "--yes")).code == apply.CHANGES
    assert (await get(nc, account, "stream", "orders"))["enabled"] is False
    assert (await nats_cli("plan", "-f", path)).code == apply.NO_CHANGES

    document["triggers"][1]["gateway_mapping"]["limit"]["time"] = 2000
    write(tmp_path / "triggers.yaml", document)
    planned = await nats_cli("plan", "-f", path)
    assert planned.lines[0] == "~ update gateway/api: gateway_mapping.limit.time 1000 -> 2000"


# --- prune -----------------------------------------------------------------------------------


async def test_prune_deletes_only_the_owners_triggers_that_the_file_no_longer_names(
    cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    document = shop()
    path = write(tmp_path / "triggers.yaml", document)
    assert (await cli("apply", "-f", path, "--yes")).code == apply.CHANGES
    await create(nc, account, stream_request("by-hand", f"{unique('h')}.a", f"{unique('h')}.b"))
    await create(
        nc, account, stream_request("theirs", f"{unique('o')}.a", f"{unique('o')}.b", collection="other")
    )

    del document["triggers"][0]  # the file no longer names stream/orders
    write(tmp_path / "triggers.yaml", document)
    without = await cli("plan", "-f", path)
    assert without.code == apply.NO_CHANGES, without
    assert "--prune would delete them: stream/orders" in without.out

    planned = await cli("plan", "-f", path, "--prune")
    assert planned.code == apply.CHANGES
    assert planned.lines == ["- delete stream/orders", "Plan: 0 to create, 0 to update, 1 to delete."]

    applied = await cli("apply", "-f", path, "--prune", "--yes")
    assert applied.code == apply.CHANGES, applied
    assert "  deleted stream/orders" in applied.lines
    assert await names(nc, account) == {"gateway/api", "stream/by-hand", "stream/theirs"}
    assert (await cli("apply", "-f", path, "--prune", "--yes")).code == apply.NO_CHANGES

    empty = write(tmp_path / "empty.yaml", {"owner": "shop", "triggers": []})
    assert (await cli("apply", "-f", empty, "--prune", "--yes")).code == apply.CHANGES
    assert await names(nc, account) == {"stream/by-hand", "stream/theirs"}, "never a trigger it does not own"


async def test_prune_needs_an_owner_and_a_trigger_of_another_owner_is_refused(
    nats_cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    unowned = write(tmp_path / "unowned.yaml", shop(owner=None))
    refused = await nats_cli("plan", "-f", unowned, "--prune")
    assert refused.code == apply.ERROR
    assert "--prune needs an `owner`" in refused.err

    document = shop()
    await create(nc, account, {**document["triggers"][0], "collection": "billing"})
    path = write(tmp_path / "triggers.yaml", document)
    conflict = await nats_cli("apply", "-f", path, "--yes")
    assert conflict.code == apply.ERROR
    assert "stream/orders (triggers[0]) belongs to owner 'billing'" in conflict.err
    assert await names(nc, account) == {"stream/orders"}, "nothing applied"
    assert (await get(nc, account, "stream", "orders"))["collection"] == "billing"


# --- a change between the plan and the apply -------------------------------------------------


def _meanwhile(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    """Run `coro` on the test's loop from apply's confirmation thread, and wait for it."""
    return lambda: asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=10)


async def test_a_trigger_changed_after_the_plan_stops_apply_with_exit_1(
    cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    document = shop()
    path = write(tmp_path / "triggers.yaml", document)
    assert (await cli("apply", "-f", path, "--yes")).code == apply.CHANGES
    document["triggers"][1]["gateway_mapping"]["timeout"] = 5000
    write(tmp_path / "triggers.yaml", document)

    other = {**document["triggers"][1], "collection": "shop", "description": "changed by someone else"}
    other["gateway_mapping"] = {**other["gateway_mapping"], "timeout": 30000}
    changed = _meanwhile(
        asyncio.get_running_loop(), request(nc, f"{PREFIX}.update.gateway.api", other, account=account)
    )
    stdin = Tty("yes\n", before=changed)
    result = await cli("apply", "-f", path, stdin=stdin)  # asks, and someone updates meanwhile

    assert stdin.asked
    assert result.code == apply.ERROR, result
    assert "~ update gateway/api: gateway_mapping.timeout 30000 -> 5000" in result.lines
    assert "gateway/api was changed (it is at revision" in result.err
    assert "after the plan read it at revision" in result.err
    assert result.out.endswith("Applied 0 of 1 changes before stopping.\n")
    live = await get(nc, account, "gateway", "api")
    assert live["description"] == "changed by someone else", "the other change is kept"
    assert live["gateway_mapping"]["timeout"] == 30000


async def test_an_owned_trigger_changed_after_the_plan_is_not_pruned(
    nats_cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    document = shop()
    path = write(tmp_path / "triggers.yaml", document)
    assert (await nats_cli("apply", "-f", path, "--yes")).code == apply.CHANGES
    kept = {**document["triggers"][0], "collection": "kept-by-hand"}
    del document["triggers"][0]
    write(tmp_path / "triggers.yaml", document)

    changed = _meanwhile(
        asyncio.get_running_loop(), request(nc, f"{PREFIX}.update.stream.orders", kept, account=account)
    )
    result = await nats_cli("apply", "-f", path, "--prune", stdin=Tty("yes\n", before=changed))
    assert result.code == apply.ERROR, result
    assert "stream/orders was changed (it is at revision" in result.err
    assert (await get(nc, account, "stream", "orders"))["collection"] == "kept-by-hand"


async def test_a_create_made_meanwhile_is_fine_when_it_is_the_same_and_stops_apply_when_not(
    nats_cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    document = shop()
    path = write(tmp_path / "triggers.yaml", document)
    loop = asyncio.get_running_loop()
    same = {**document["triggers"][0], "collection": "shop"}
    result = await nats_cli(
        "apply", "-f", path, stdin=Tty("yes\n", before=_meanwhile(loop, create(nc, account, same)))
    )
    assert result.code == apply.CHANGES, result
    assert "  stream/orders exists already, as the file asks\n" in result.out
    assert "  created gateway/api (revision " in result.out

    other = {**document["triggers"][0], "name": "late", "description": "not the file's"}
    document["triggers"].append({**other, "description": "the file's"})
    write(tmp_path / "triggers.yaml", document)
    result = await nats_cli(
        "apply", "-f", path, stdin=Tty("yes\n", before=_meanwhile(loop, create(nc, account, other)))
    )
    assert result.code == apply.ERROR
    assert "stream/late was created by somebody else since the plan read the account" in result.err


async def test_apply_asks_and_applies_nothing_without_yes(
    nats_cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    path = write(tmp_path / "triggers.yaml", shop())
    no_terminal = await nats_cli("apply", "-f", path)
    assert no_terminal.code == apply.ERROR
    assert "pass --yes" in no_terminal.err
    declined = await nats_cli("apply", "-f", path, stdin=Tty("no\n"))
    assert declined.code == apply.ERROR
    assert declined.lines[-1].endswith("Nothing applied.")
    assert await names(nc, account) == set()
    accepted = await nats_cli("apply", "-f", path, stdin=Tty("yes\n"))
    assert accepted.code == apply.CHANGES
    assert await names(nc, account) == {"stream/orders", "gateway/api"}


# --- export ----------------------------------------------------------------------------------


async def test_export_writes_a_file_that_apply_takes_unchanged(
    cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    service_route = stream_request("rpc", f"{unique('svc')}.x", f"{unique('rpc')}.x", description="rpc")
    service_route["source"] = {**service_route["source"], "type": "service", "response_type": "Stream"}
    service_route["target"] = {**service_route["target"], "type": "service"}
    await create(nc, account, service_route)
    await create(nc, account, stream_request("plain", f"{unique('p')}.a", f"{unique('p')}.b", collection="x"))
    await create(nc, account, gateway_request("plain-gw", "PUT", f"/{unique('g')}/plain"))
    split = gateway_request(
        "split",
        "GET",
        f"/{unique('g')}/café",
        is_public=True,
        timeout=1234,
        limit={"request": 5, "time": 1000},
        traffic_distribution={"v1": 70, "v2": 30},
    )
    await create(nc, account, split)

    out = tmp_path / "exported.yaml"
    exported = await cli("export", "-o", str(out))
    assert exported.code == apply.NO_CHANGES, exported
    assert "wrote 4 trigger(s)" in exported.err
    text = out.read_text()
    assert text.startswith("# exported by `trigger-service export`")
    document = yaml.safe_load(text)
    assert "owner" not in document
    assert [t["name"] for t in document["triggers"]] == ["plain-gw", "split", "plain", "rpc"]
    plain, split_mapping = (t["gateway_mapping"] for t in document["triggers"][:2])
    assert set(plain) == {"method", "path"}, "defaults the service filled in are left out"
    assert split_mapping["timeout"] == 1234
    assert split_mapping["is_public"] is True
    assert split_mapping["path"].endswith("/caf%C3%A9")
    assert document["triggers"][2]["collection"] == "x"

    planned = await cli("plan", "-f", str(out))
    assert planned.code == apply.NO_CHANGES, planned
    assert (await cli("apply", "-f", str(out), "--yes")).code == apply.NO_CHANGES

    as_json = await cli("export", "--format", "json")
    assert json.loads(as_json.out)["triggers"] == document["triggers"]


async def test_export_of_an_owner_is_that_owners_file(
    nats_cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    path = write(tmp_path / "triggers.yaml", shop())
    assert (await nats_cli("apply", "-f", path, "--yes")).code == apply.CHANGES
    await create(nc, account, stream_request("other", f"{unique('o')}.a", f"{unique('o')}.b"))

    out = tmp_path / "shop.json"
    assert (await nats_cli("export", "--owner", "shop", "-o", str(out))).code == apply.NO_CHANGES
    document = json.loads(out.read_text())
    assert document["owner"] == "shop"
    assert sorted(t["name"] for t in document["triggers"]) == ["api", "orders"]
    assert all("collection" not in t for t in document["triggers"])
    assert (await nats_cli("apply", "-f", str(out), "--prune", "--yes")).code == apply.NO_CHANGES


# --- exit codes and errors -------------------------------------------------------------------


async def test_errors_are_exit_1_with_a_message(
    nats_cli: Cli, tmp_path: Path, nats_server: NatsServer
) -> None:
    path = write(tmp_path / "triggers.yaml", shop())
    usage = await nats_cli("plan")
    assert usage.code == apply.ERROR
    assert "-f/--file" in usage.err

    out, err = io.StringIO(), io.StringIO()
    argv = ["plan", "-f", path, "--nats-url", nats_server.url]
    code = await apply.run(argv, stdout=out, stderr=err, stdin=io.StringIO(), environ={})
    assert code == apply.ERROR
    assert "--token or TRIGGER_TOKEN" in err.getvalue()
    code = await apply.run(
        argv, stdout=out, stderr=err, stdin=io.StringIO(), environ={"TRIGGER_TOKEN": token(nats_cli.account)}
    )
    assert code == apply.CHANGES, "the token from TRIGGER_TOKEN"

    with socket.socket() as sock:  # a port nothing listens on (bound, never listening)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        for where in (["--nats-url", f"nats://127.0.0.1:{port}"], ["--url", f"http://127.0.0.1:{port}"]):
            down = await Cli(where, nats_cli.account)("plan", "-f", path, "--timeout", "2")
            assert down.code == apply.ERROR
            assert down.err.startswith("error: "), down

    wrong_prefix = await Cli(["--nats-url", nats_server.url, "--prefix", "no.such"], nats_cli.account)(
        "plan", "-f", path
    )
    assert wrong_prefix.code == apply.ERROR
    assert "no Trigger Service answers" in wrong_prefix.err


async def test_a_bad_file_is_exit_1_naming_each_entry_and_field(
    nats_cli: Cli, nc: Client, account: str, tmp_path: Path
) -> None:
    document = shop()
    document["triggers"][0]["source"]["subjekt"] = "typo"
    document["triggers"][1]["gateway_mapping"]["timeout"] = "5000"
    document["triggers"].append({"name": "x"})
    path = write(tmp_path / "bad.yaml", document)
    result = await nats_cli("apply", "-f", path, "--yes")
    assert result.code == apply.ERROR
    assert result.err.splitlines() == [
        f"error: {path}: triggers[0] (stream/orders): Object contains unknown field `subjekt` - at "
        "`$.triggers[0].source`",
        f"error: {path}: triggers[1] (gateway/api): Expected `int`, got `str` - at "
        "`$.triggers[1].gateway_mapping.timeout`",
        f"error: {path}: triggers[2] (x): `trigger_type` must be 'stream' or 'gateway', not None - at "
        "`$.triggers[2].trigger_type`",
    ]
    assert await names(nc, account) == set()


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        ("", "t.yaml", "the file is empty"),
        ("triggers: [\n", "t.yaml", "not valid YAML"),
        ('{"triggers": [}', "t.json", "not valid JSON"),
        ('{"triggers": [], "triggers": []}', "t.json", "duplicate key 'triggers'"),
        ("triggers: []\ntriggers: []\n", "t.yaml", "duplicate key 'triggers'"),
        ("- name: a\n", "t.yaml", "Expected `object`, got `array` - at `$`"),
        ("owner: x\ntrigger: []\n", "t.yaml", "Object contains unknown field `trigger` - at `$`"),
        ("owner: ''\ntriggers: []\n", "t.yaml", "Expected `str` of length >= 1 - at `$.owner`"),
        ("triggers: [3]\n", "t.yaml", "triggers[0]: expected an object (a create request), got int"),
        (
            "triggers:\n- {name: a, trigger_type: stream, source: {subject: a},"
            " target: {subject: b, type: service}}",
            "t.yaml",
            "target.type ('service') must equal source.type ('stream') - at `$.triggers[0].target.type`",
        ),
        (
            "owner: shop\ntriggers:\n- {name: a, trigger_type: stream, collection: other,"
            " source: {subject: a}, target: {subject: b}}",
            "t.yaml",
            "`collection` holds the file's owner tag ('shop'); leave it out or set it to the owner, not "
            "'other' - at `$.triggers[0].collection`",
        ),
        (
            "triggers:\n- {name: a, trigger_type: gateway,"
            " gateway_mapping: {method: GET, path: /x/../healthz}}",
            "t.yaml",
            "is reserved by the gateway",
        ),
        (
            "triggers:\n- {name: a, trigger_type: stream, source: {subject: a}, target: {subject: b}}\n"
            "- {name: a, trigger_type: stream, source: {subject: c}, target: {subject: d}}\n",
            "t.yaml",
            "triggers[1] (stream/a): the same trigger as triggers[0]",
        ),
        (
            "triggers:\n- name: a\n  name: b\n",
            "t.yaml",
            "duplicate key 'name'",
        ),
    ],
)
def test_a_bad_file_says_what_is_wrong_and_where(text: str, name: str, message: str) -> None:
    with pytest.raises(manifest.ManifestError) as caught:
        manifest.parse(text.encode(), name)
    assert message in str(caught.value)
    assert str(caught.value).startswith(name)


def test_yaml_keys_are_read_as_written_and_json_is_found_by_content() -> None:
    text = b"triggers:\n- {name: g, trigger_type: gateway, gateway_mapping: {method: GET, path: /v,"
    text += b" traffic_distribution: {1: 60, 2: 40}}}\n"
    parsed = manifest.parse(text, "triggers")
    request = parsed.entries[0].request
    assert request.gateway_mapping.traffic_distribution == {"1": 60, "2": 40}
    assert manifest.parse(b'  {"triggers": []}', "-").entries == ()


def test_defaults_come_from_the_request_types() -> None:
    """The configuration compared is each request type's fields that the record stores."""
    gateway = apply.config_shape(manifest.REQUESTS["gateway"], apply.RECORDS["gateway"])
    fields = {name: nested for _, name, nested in gateway.fields}
    assert "trigger_type" not in fields, "the tag names the trigger, it is no configuration"
    mapping = {name for _, name, _ in fields["gateway_mapping"].fields}
    assert {"method", "path", "is_public", "timeout", "limit"} <= mapping
    assert not {"subject", "gateway", "error"} & mapping, "accepted and ignored: never a diff"


# --- the console script ----------------------------------------------------------------------


def _clean_environ() -> dict[str, str]:
    """This process's environment without the variables the command line reads."""
    read = ("NATS_URL", "NATS_CREDS", "TRIGGER_PREFIX", "TRIGGER_TOKEN")
    return {k: v for k, v in os.environ.items() if k not in read}


async def test_trigger_service_plan_is_the_console_command(
    nats_server: NatsServer, account: str, tmp_path: Path
) -> None:
    path = write(tmp_path / "triggers.yaml", shop())
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "plan",
        "-f",
        path,
        env={**_clean_environ(), "NATS_URL": nats_server.url, "TRIGGER_TOKEN": token(account)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == apply.CHANGES, err.decode()
    assert out.decode().splitlines()[0] == "+ create stream/orders"


async def test_the_client_reads_every_page(transport: list[str], nc: Client, account: str) -> None:
    for i in range(5):
        await create(nc, account, stream_request(f"s{i}", f"{unique('p')}.a", f"{unique('p')}.b"))
    where = {"url": transport[1]} if transport[0] == "--url" else {"nats_url": transport[1]}
    async with connect(token=token(account), **where) as client:
        records = await client.list_all(PREFIX, page=2)
    assert sorted(r["name"] for r in records) == ["s0", "s1", "s2", "s3", "s4"]


async def test_the_file_may_come_from_standard_input(nats_cli: Cli, nc: Client, account: str) -> None:
    text = json.dumps(shop())
    planned = await nats_cli("plan", "-f", "-", stdin=io.StringIO(text))
    assert planned.code == apply.CHANGES, planned
    assert planned.lines[-1] == "Plan: 2 to create, 0 to update, 0 to delete."
    applied = await nats_cli("apply", "-f", "-", "--yes", stdin=io.StringIO(text))
    assert applied.code == apply.CHANGES, applied
    assert await names(nc, account) == {"stream/orders", "gateway/api"}
    assert (await nats_cli("plan", "-f", "-", stdin=io.StringIO(text))).lines == [
        "No changes: the live triggers match <stdin>."
    ]
