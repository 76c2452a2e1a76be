"""The file format of `trigger-service apply`: a document of triggers, in YAML or JSON.

    owner: team-shop          # optional: the tag of the triggers this file manages (their `collection`)
    triggers:                 # create bodies, exactly as the API takes them
      - name: orders
        trigger_type: stream
        source: {subject: shop.orders}
        target: {subject: audit.orders}

Every entry is validated with the API's own request types (`schemas.triggers`), so a file is valid
exactly when each of its entries would be a valid create request; an error names the entry (index,
type and name) and the field. YAML mapping keys are read as written (strings, as JSON's are), and a
key given twice in one mapping is an error rather than a silent overwrite.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import yaml
from msgspec import Meta

from schemas.triggers import GatewayTriggerRequest, Request, StreamTriggerRequest
from service import paths

# The request type of each trigger type a file may hold: the create bodies of the API.
REQUESTS: dict[str, type[StreamTriggerRequest | GatewayTriggerRequest]] = {
    "stream": StreamTriggerRequest,
    "gateway": GatewayTriggerRequest,
}
TriggerRequest = StreamTriggerRequest | GatewayTriggerRequest
# The owner tag is stored as each trigger's `collection`, so it takes that field's constraints.
Owner = Annotated[str, Meta(min_length=1, max_length=4096)]
_AT = re.compile(r"`\$")


class Document(Request):
    """The file's top level (unknown keys rejected, as in requests)."""

    triggers: list[Any]
    owner: Owner | None = None


class ManifestError(Exception):
    """A file that cannot be applied; `errors` holds one line per problem found."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Entry:
    """One trigger of the file: its place in the file and its validated create request."""

    index: int
    request: TriggerRequest

    @property
    def key(self) -> tuple[str, str]:
        """(trigger type, name): how a trigger is named in an account."""
        return self.request.trigger_type, self.request.name


@dataclass(frozen=True)
class Manifest:
    """A validated file: where it came from, its owner tag, and its triggers in file order."""

    source: str
    owner: str | None
    entries: tuple[Entry, ...]


def read(path: str, stdin_text: str | None = None) -> Manifest:
    """Read and validate the file at `path` (`-`: `stdin_text`)."""
    if path == "-":
        return parse((stdin_text or "").encode(), "<stdin>")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ManifestError([f"{path}: cannot read the file: {exc.strerror or exc}"]) from None
    return parse(data, path)


def parse(data: bytes, source: str) -> Manifest:
    """Parse YAML or JSON (by the name's extension, else by the content) and validate it."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError([f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    try:
        document = _load_json(text) if _is_json(source, text) else _load_yaml(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ManifestError([f"{source}: not valid {_format_name(source, text)}: {exc}"]) from None
    if document is None:
        raise ManifestError([f"{source}: the file is empty (expected `triggers:` and an optional `owner:`)"])
    try:
        doc = msgspec.convert(document, Document)
    except msgspec.ValidationError as exc:
        raise ManifestError([f"{source}: {_at(exc, '$')}"]) from None
    errors: list[str] = []
    entries: list[Entry] = []
    seen: dict[tuple[str, str], int] = {}
    for index, raw in enumerate(doc.triggers):
        entry = _entry(index, raw, doc.owner, errors, source)
        if entry is None:
            continue
        if (first := seen.setdefault(entry.key, index)) != index:
            errors.append(f"{source}: {_label(index, raw)}: the same trigger as triggers[{first}]")
            continue
        entries.append(entry)
    if errors:
        raise ManifestError(errors)
    return Manifest(source=source, owner=doc.owner, entries=tuple(entries))


def _entry(index: int, raw: Any, owner: str | None, errors: list[str], source: str) -> Entry | None:
    where = f"{source}: {_label(index, raw)}"
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected an object (a create request), got {type(raw).__name__}")
        return None
    trigger_type = raw.get("trigger_type")
    request_type = REQUESTS.get(trigger_type) if isinstance(trigger_type, str) else None
    if request_type is None:
        choices = " or ".join(repr(t) for t in REQUESTS)
        errors.append(
            f"{where}: `trigger_type` must be {choices}, not {trigger_type!r}"
            f" - at `$.triggers[{index}].trigger_type`"
        )
        return None
    try:
        request = msgspec.convert(raw, request_type)
    except msgspec.ValidationError as exc:
        errors.append(f"{where}: {_at(exc, f'$.triggers[{index}]')}")
        return None
    if owner is not None and request.collection not in (None, owner):
        errors.append(
            f"{where}: `collection` holds the file's owner tag ({owner!r}); leave it out or set it to "
            f"the owner, not {request.collection!r} - at `$.triggers[{index}].collection`"
        )
        return None
    if isinstance(request, GatewayTriggerRequest):
        try:
            paths.trigger_path(request.gateway_mapping.path)
        except paths.PathError as exc:
            errors.append(
                f"{where}: `path` {request.gateway_mapping.path!r} {exc} - at "
                f"`$.triggers[{index}].gateway_mapping.path`"
            )
            return None
    return Entry(index=index, request=request)


def _at(exc: msgspec.ValidationError, base: str) -> str:
    """msgspec's message with its path under `base` (msgspec leaves out the path of the top level)."""
    message = str(exc)
    if " - at `$" not in message:
        return f"{message} - at `{base}`"
    return _AT.sub(f"`{base}", message)


def _label(index: int, raw: Any) -> str:
    """`triggers[3] (stream/orders)`, with as much of the name as the entry has."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        return f"triggers[{index}]"
    if isinstance(raw.get("trigger_type"), str):
        return f"triggers[{index}] ({raw['trigger_type']}/{raw['name']})"
    return f"triggers[{index}] ({raw['name']})"


def _is_json(source: str, text: str) -> bool:
    suffix = Path(source).suffix.lower()
    if suffix in (".yaml", ".yml"):
        return False
    return suffix == ".json" or text.lstrip()[:1] in ("{", "[")


def _format_name(source: str, text: str) -> str:
    return "JSON" if _is_json(source, text) else "YAML"


def _load_json(text: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type hints
    """Safe YAML whose mapping keys are the text as written, and unique."""


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[str, Any]:
    loader.flatten_mapping(node)  # `<<` merge keys
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            )
        key = key_node.value
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only, never objects


def dump(document: dict[str, Any], fmt: str, header: str | None = None) -> str:
    """The document as `yaml` (with `header` as a comment) or `json` text."""
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    text: str = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, default_flow_style=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return text


def format_for(path: str | None, explicit: str | None) -> str:
    """`json` or `yaml`: as asked, else by the output file's extension, else YAML."""
    if explicit:
        return explicit
    return "json" if path and Path(path).suffix.lower() == ".json" else "yaml"
