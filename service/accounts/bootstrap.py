"""`trigger-service accounts init DIR`: a development operator, its accounts, and a nats-server config.

What it writes under DIR:
- `operator.jwt`, `operator.nk` (identity seed) and `operator-signer.nk` (the signing key the
  service signs account JWTs with: TRIGGER_OPERATOR_SEED);
- `accounts/<name>.jwt` and `accounts/<name>.nk` for the system account `SYS`, the service's
  account `TRIGGER` (JetStream enabled, exports the Trigger API `<prefix>.>` as a service) and the
  tenant accounts, which import that API so their users can call it, and `TRIGGER_RELAY` (JetStream
  enabled), where durable stream triggers are captured and delivered from (service.relay);
- `creds/<name>.creds`, one user per account;
- `nats-server.conf` (operator mode, full resolver, the account JWTs preloaded),
  `service.env` (the service's environment) and `accounts.json` (what `load` reads back).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgspec

from service.accounts import jwt

SYSTEM, SERVICE, RELAY = "SYS", "TRIGGER", "TRIGGER_RELAY"
TENANTS = ("tenant-a", "tenant-b")
MANIFEST = "accounts.json"


class DevAccount(msgspec.Struct, frozen=True):
    """One generated account: its name, public key and files."""

    name: str
    public_key: str
    jwt: str
    seed: str
    creds: str


class DevOperator(msgspec.Struct, frozen=True):
    """Everything `init` generated (the content of accounts.json)."""

    root: str
    prefix: str
    operator: str
    operator_jwt: str
    operator_seed: str
    signing_seed: str
    system: DevAccount
    service: DevAccount
    relay: DevAccount
    tenants: list[DevAccount]

    @property
    def accounts(self) -> list[DevAccount]:
        """Every account, the system account first."""
        return [self.system, self.service, self.relay, *self.tenants]

    def env(self) -> dict[str, str]:
        """The service's environment for accounts mode."""
        return {
            "TRIGGER_ROUTING": "accounts",
            "TRIGGER_OPERATOR_SEED": self.signing_seed,
            "TRIGGER_SYSTEM_CREDS": self.system.creds,
            "NATS_CREDS": self.service.creds,
            "TRIGGER_RELAY_CREDS": self.relay.creds,
            "TRIGGER_PREFIX": self.prefix,
        }


def create(root: Path, *, prefix: str = "ms.trigger", tenants: tuple[str, ...] = TENANTS) -> DevOperator:
    """Generate a development operator with its accounts, users and creds under `root`."""
    root = root.resolve()
    for sub in ("accounts", "creds"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    operator = jwt.new_key("operator")
    signer = jwt.new_key("operator")
    _write(root / "operator.nk", jwt.seed_of(operator) + "\n", secret=True)
    _write(root / "operator-signer.nk", jwt.seed_of(signer) + "\n", secret=True)

    keys = {name: jwt.new_key("account") for name in (SYSTEM, SERVICE, RELAY, *tenants)}
    service_key = jwt.public_key(keys[SERVICE])
    api = f"{prefix}.>"
    claims = {
        SYSTEM: jwt.account_claims(jwt.public_key(keys[SYSTEM]), SYSTEM),
        SERVICE: jwt.account_claims(
            service_key,
            SERVICE,
            jetstream=True,
            exports=[
                {"name": "trigger-api", "subject": api, "type": "service", "response_type": "Singleton"}
            ],
        ),
        RELAY: jwt.account_claims(jwt.public_key(keys[RELAY]), RELAY, jetstream=True),
    }
    for name in tenants:
        claims[name] = jwt.account_claims(
            jwt.public_key(keys[name]),
            name,
            imports=[{"name": "trigger-api", "subject": api, "account": service_key, "type": "service"}],
        )
    made = {name: _account(root, name, keys[name], claims[name], signer) for name in keys}

    operator_key = jwt.public_key(operator)
    operator_jwt = jwt.encode(
        jwt.operator_claims(
            operator_key,
            "trigger-dev",
            signing_keys=[jwt.public_key(signer)],
            system_account=made[SYSTEM].public_key,
        ),
        operator,
    )
    _write(root / "operator.jwt", operator_jwt + "\n")
    dev = DevOperator(
        root=str(root),
        prefix=prefix,
        operator=operator_key,
        operator_jwt=str(root / "operator.jwt"),
        operator_seed=str(root / "operator.nk"),
        signing_seed=str(root / "operator-signer.nk"),
        system=made[SYSTEM],
        service=made[SERVICE],
        relay=made[RELAY],
        tenants=[made[name] for name in tenants],
    )
    _write(root / MANIFEST, msgspec.json.format(msgspec.json.encode(dev)).decode() + "\n")
    _write(root / "service.env", "".join(f"{k}={v}\n" for k, v in dev.env().items()))
    _write(
        root / "nats-server.conf",
        server_config(dev, resolver_dir=root / "resolver", store_dir=root / "jetstream"),
    )
    return dev


def _account(root: Path, name: str, key: object, claims: dict[str, object], signer: object) -> DevAccount:
    account_jwt = jwt.encode(claims, signer)
    user = jwt.new_key("user")
    user_jwt = jwt.encode(jwt.user_claims(jwt.public_key(user), f"{name}-user"), key)
    files = (
        root / "accounts" / f"{name}.jwt",
        root / "accounts" / f"{name}.nk",
        root / "creds" / f"{name}.creds",
    )
    _write(files[0], account_jwt + "\n")
    _write(files[1], jwt.seed_of(key) + "\n", secret=True)
    _write(files[2], jwt.creds(user_jwt, jwt.seed_of(user)), secret=True)
    return DevAccount(name, jwt.public_key(key), *(str(f) for f in files))


def _write(path: Path, text: str, *, secret: bool = False) -> None:
    path.write_text(text)
    if secret:
        path.chmod(0o600)


def load(root: Path) -> DevOperator:
    """What `create` generated under `root`."""
    return msgspec.json.decode((root / MANIFEST).read_bytes(), type=DevOperator)


def server_config(
    dev: DevOperator,
    *,
    resolver_dir: Path,
    store_dir: Path,
    port: int = 4222,
    http_port: int | None = 8222,
    host: str = "127.0.0.1",
) -> str:
    """A nats-server configuration for operator mode with the full resolver and JetStream."""
    preload = "".join(
        f"  {account.public_key}: {json.dumps(Path(account.jwt).read_text().strip())}\n"
        for account in dev.accounts
    )
    monitor = f"http_port: {http_port}\n" if http_port is not None else ""
    return (
        "# nats-server in operator mode, written by `trigger-service accounts init`.\n"
        f"host: {json.dumps(host)}\n"
        f"port: {port}\n"
        f"{monitor}"
        "max_payload: 1MB\n"
        f"operator: {json.dumps(dev.operator_jwt)}\n"
        f"system_account: {dev.system.public_key}\n"
        "resolver: {\n"
        "  type: full\n"
        f"  dir: {json.dumps(str(resolver_dir))}\n"
        "  allow_delete: false\n"
        '  interval: "2m"\n'
        "}\n"
        f"resolver_preload: {{\n{preload}}}\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(store_dir))}\n"
        "  max_memory_store: 256MB\n"
        "  max_file_store: 2GB\n"
        "}\n"
    )


def main(argv: list[str]) -> int:
    """`trigger-service accounts init DIR [--prefix P] [--force]`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="trigger-service accounts init",
        description="Generate a development NATS operator, accounts, creds and an operator-mode config.",
    )
    parser.add_argument("dir", type=Path, help="directory to write into")
    parser.add_argument("--prefix", default="ms.trigger", help="subject prefix of the Trigger API")
    parser.add_argument("--force", action="store_true", help="overwrite an existing operator in DIR")
    args = parser.parse_args(argv)
    if (args.dir / MANIFEST).exists() and not args.force:
        print(
            f"{args.dir / MANIFEST} exists: keeping that operator (use --force to replace it)",
            file=sys.stderr,
        )
        return 1
    dev = create(args.dir, prefix=args.prefix)
    print(f"operator {dev.operator} written to {dev.root}")
    for account in dev.accounts:
        print(f"  account {account.name:<10} {account.public_key}  creds {account.creds}")
    print(f"nats-server:  nats-server -c {Path(dev.root) / 'nats-server.conf'}")
    print(f"the service:  env $(cat {Path(dev.root) / 'service.env'}) TRIGGER_JWT_SECRET=... trigger-service")
    return 0
