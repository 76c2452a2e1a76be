"""Console scripts: `trigger-service` and `trigger-gateway`."""

from __future__ import annotations

import sys
from typing import NoReturn

from service import config, eventloop, log
from service.serverversion import ServerTooOld


def _settings() -> config.Settings:
    try:
        return config.load()
    except config.ConfigError as exc:
        _refuse(exc)


def _loop() -> str:
    try:
        return eventloop.chosen()
    except config.ConfigError as exc:
        _refuse(exc)


def _refuse(exc: config.ConfigError | ServerTooOld) -> NoReturn:
    """One line on stderr and exit code 2: a start that cannot succeed until someone changes something."""
    what = "unsupported NATS server" if isinstance(exc, ServerTooOld) else "configuration error"
    print(f"{what}: {exc}", file=sys.stderr)
    raise SystemExit(2) from None


def service_main(argv: list[str] | None = None) -> None:
    """Run the Trigger Service."""
    args = sys.argv[1:] if argv is None else argv
    if args[:2] == ["accounts", "init"]:
        from service.accounts.bootstrap import main as accounts_init

        raise SystemExit(accounts_init(args[2:]))
    if args[:1] in (["apply"], ["plan"], ["diff"], ["export"]):
        from service.apply import main as apply_main

        raise SystemExit(apply_main(args))
    if args:
        print("usage: trigger-service [accounts init DIR | plan|diff|apply|export ...]", file=sys.stderr)
        raise SystemExit(2)
    settings = _settings()
    loop = _loop()
    log.configure(settings.log_level, settings.log_format)
    from service.app import serve

    try:
        eventloop.run(serve(settings), loop)
    except (config.ConfigError, ServerTooOld) as exc:  # found at start-up, e.g. an untrusted signing key
        _refuse(exc)


def gateway_main(argv: list[str] | None = None) -> None:
    """Run the HTTP sidecar."""
    settings = _settings()
    loop = _loop()
    if settings.http_workers > 1:
        if settings.http_addr.rsplit(":", 1)[1] == "0":
            _refuse(
                config.ConfigError("TRIGGER_HTTP_WORKERS: the workers share one port; port 0 picks one each")
            )
        from service.gateway.workers import supervise

        raise SystemExit(supervise(settings.http_workers, lambda: _gateway(settings, loop)))
    _gateway(settings, loop)


def _gateway(settings: config.Settings, loop: str) -> int:
    log.configure(settings.log_level, settings.log_format)
    from service.gateway.app import serve

    try:
        eventloop.run(serve(settings), loop)
    except ServerTooOld as exc:
        _refuse(exc)
    return 0
