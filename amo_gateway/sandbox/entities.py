"""The sandbox's leads, contacts and companies: in-memory records with amoCRM's list, get, create and update.

Pure: no HTTP here. The handlers (crm_api.py) parse a request into a ListQuery or a JSON body, call an
EntityStore, and render what it returns with amoCRM's HAL shape (`_page`, `_links`, `_embedded`), every
href absolute on the host the request named, as amoCRM writes them. Ids are global across accounts and
types never share a counter, as in amoCRM; nothing survives a restart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

ENTITY_TYPES = ("leads", "contacts", "companies")
DEFAULT_LIMIT, MAX_LIMIT = 50, 250
# Fields a caller may set, and the JSON type each must have (amoCRM refuses another type per item).
_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "leads": {"name": str, "price": int, "status_id": int, "pipeline_id": int, "responsible_user_id": int,
              "custom_fields_values": list},
    "contacts": {"name": str, "first_name": str, "last_name": str, "responsible_user_id": int,
                 "custom_fields_values": list},
    "companies": {"name": str, "responsible_user_id": int, "custom_fields_values": list},
}
_FILTER_ID = re.compile(r"filter\[id\](?:\[\d*\])?")  # filter[id], filter[id][], filter[id][0]


class ValidationFailed(Exception):
    """amoCRM's 400 for a request it understood but refused: `validation-errors` per item."""

    def __init__(self, request_id: str, code: str, path: str, detail: str) -> None:
        super().__init__(detail)
        self.errors = [{"request_id": request_id, "errors": [{"code": code, "path": path, "detail": detail}]}]

    def body(self) -> dict[str, Any]:
        """The problem document amoCRM sends for a refused write or query."""
        return {"validation-errors": self.errors, "title": "Bad Request", "type": "https://httpstatus.es/400",
                "status": 400, "detail": "Request validation failed"}


@dataclass(frozen=True)
class ListQuery:
    """What a list request asks for: one page, optionally narrowed by ids and a search, plus relations."""

    page: int = 1
    limit: int = DEFAULT_LIMIT
    ids: frozenset[int] | None = None
    search: str | None = None
    with_: tuple[str, ...] = ()


def _positive(raw: str | None, name: str, default: int, ceiling: int | None = None) -> int:
    """A positive integer query parameter; amoCRM's validation error otherwise."""
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) < 1 or (ceiling is not None and int(raw) > ceiling):
        limit = f" and at most {ceiling}" if ceiling else ""
        raise ValidationFailed("0", "InvalidValue", name, f"{name} must be a whole number from 1{limit}")
    return int(raw)


def parse_list_query(pairs: Iterable[tuple[str, str]]) -> ListQuery:
    """A ListQuery from the decoded query pairs (`filter[id][]=1&filter[id][]=2`, `with=contacts`, …)."""
    values: dict[str, str] = {}
    ids: set[int] | None = None
    for key, value in pairs:
        if _FILTER_ID.fullmatch(key):
            for part in value.split(","):
                if not part.strip().isdigit():
                    raise ValidationFailed("0", "InvalidType", "filter.id", "ids must be whole numbers")
                ids = (ids or set()) | {int(part)}
        else:
            values.setdefault(key, value)
    with_ = tuple(w.strip() for w in values.get("with", "").split(",") if w.strip())
    return ListQuery(page=_positive(values.get("page"), "page", 1),
                     limit=_positive(values.get("limit"), "limit", DEFAULT_LIMIT, MAX_LIMIT),
                     ids=frozenset(ids) if ids is not None else None, search=values.get("query") or None,
                     with_=with_)


@dataclass
class _Record:
    """One stored entity: its fields and the ids of the entities linked to it, by type."""

    fields: dict[str, Any]
    links: dict[str, list[int]] = field(default_factory=dict)


class EntityStore:
    """Every account's leads, contacts and companies, with the ids handed out so far."""

    def __init__(self, next_ids: Mapping[str, int] | None = None) -> None:
        self._records: dict[tuple[int, str], dict[int, _Record]] = {}
        self._next = dict(next_ids or {"leads": 1000001, "contacts": 2000001, "companies": 3000001})

    def seed(self, account_id: int, user_id: int, count: int, now: int) -> None:
        """`count` leads, contacts and companies named `Lead 1`, `Contact 1`, … for a fresh account."""
        for kind in ENTITY_TYPES:
            title = kind[:-1].capitalize() if kind != "companies" else "Company"
            items = [{"name": f"{title} {i}"} | ({"price": 1000 * i} if kind == "leads" else {})
                     for i in range(1, count + 1)]
            self.create(account_id, user_id, kind, items, now)

    def count(self, account_id: int, kind: str) -> int:
        """How many entities of this type the account holds."""
        return len(self._records.get((account_id, kind), {}))

    def select(self, account_id: int, kind: str, query: ListQuery) -> tuple[list[dict[str, Any]], bool]:
        """The page's records (fields plus links) in id order, and whether another page follows."""
        chosen = [r for r in self._table(account_id, kind).values() if _matches(r, query)]
        start = (query.page - 1) * query.limit
        page = chosen[start:start + query.limit]
        return [_with_links(r) for r in page], start + query.limit < len(chosen)

    def get(self, account_id: int, kind: str, entity_id: int) -> dict[str, Any] | None:
        """One record of the account (fields plus links), or None: amoCRM answers 204 for an unknown id."""
        record = self._table(account_id, kind).get(entity_id)
        return None if record is None else _with_links(record)

    def create(self, account_id: int, user_id: int, kind: str, items: list[Any], now: int) -> list[dict[str, Any]]:
        """Store new entities; returns `{id, request_id}` per item, in order. All or nothing."""
        checked = [_checked(kind, item, str(i)) for i, item in enumerate(items)]
        table, made = self._table(account_id, kind), []
        for index, (values, links) in enumerate(checked):
            entity_id = self._next[kind]
            self._next[kind] += 1
            table[entity_id] = _Record(_base_fields(kind, entity_id, account_id, user_id, now) | values, links)
            made.append({"id": entity_id, "request_id": str(items[index].get("request_id", index))})
        return made

    def update(self, account_id: int, user_id: int, kind: str, items: list[Any], now: int) -> list[dict[str, Any]]:
        """Change existing entities (each item names its `id`); returns `{id, updated_at, request_id}`."""
        table = self._table(account_id, kind)
        checked = [(_existing_id(table, item, str(i)), _checked(kind, item, str(i))) for i, item in enumerate(items)]
        done = []
        for index, (entity_id, (values, links)) in enumerate(checked):
            record = table[entity_id]
            record.fields |= values | {"updated_at": now, "updated_by": user_id}
            for rel, ids in links.items():
                record.links[rel] = sorted(set(record.links.get(rel, [])) | set(ids))
            done.append({"id": entity_id, "updated_at": now, "request_id": str(items[index].get("request_id", index))})
        return done

    def _table(self, account_id: int, kind: str) -> dict[int, _Record]:
        return self._records.setdefault((account_id, kind), {})


def _matches(record: _Record, query: ListQuery) -> bool:
    """Whether a record passes `filter[id]` and the full-text `query` (id, or a name containing it)."""
    fields = record.fields
    if query.ids is not None and fields["id"] not in query.ids:
        return False
    if query.search is None:
        return True
    needle = query.search.casefold()
    names = (fields.get(k) for k in ("name", "first_name", "last_name"))
    return needle == str(fields["id"]) or any(isinstance(n, str) and needle in n.casefold() for n in names)


def _with_links(record: _Record) -> dict[str, Any]:
    return {**record.fields, "_linked": {k: list(v) for k, v in record.links.items()}}


def _checked(kind: str, item: Any, request_id: str) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """The settable fields of one item and its `_embedded` links; ValidationFailed names the first fault."""
    if not isinstance(item, dict):
        raise ValidationFailed(request_id, "InvalidType", "", "each item must be an object")
    values = {}
    for name, kinds in _FIELDS[kind].items():
        if name in item and item[name] is not None:
            if not isinstance(item[name], kinds) or isinstance(item[name], bool):
                raise ValidationFailed(request_id, "InvalidType", name, f"{name} has the wrong type")
            values[name] = item[name]
    return values, _embedded_links(item.get("_embedded"), request_id)


def _embedded_links(embedded: Any, request_id: str) -> dict[str, list[int]]:
    """`_embedded: {"contacts": [{"id": 5}]}` as `{"contacts": [5]}`."""
    links: dict[str, list[int]] = {}
    if not isinstance(embedded, dict):
        return links
    for rel in ENTITY_TYPES:
        for ref in embedded.get(rel) or []:
            if not isinstance(ref, dict) or not isinstance(ref.get("id"), int):
                raise ValidationFailed(request_id, "InvalidType", f"_embedded.{rel}.id", "a link needs an id")
            links.setdefault(rel, []).append(ref["id"])
    return links


def _existing_id(table: Mapping[int, _Record], item: Any, request_id: str) -> int:
    """The `id` an update item names, which must exist; ValidationFailed otherwise."""
    entity_id = item.get("id") if isinstance(item, dict) else None
    if not isinstance(entity_id, int) or entity_id not in table:
        raise ValidationFailed(request_id, "NotFound", "id", "an update needs the id of an existing entity")
    return entity_id


def _base_fields(kind: str, entity_id: int, account_id: int, user_id: int, now: int) -> dict[str, Any]:
    """The fields amoCRM fills in itself on create."""
    common = {"id": entity_id, "name": "", "responsible_user_id": user_id, "group_id": 0, "created_by": user_id,
              "updated_by": user_id, "created_at": now, "updated_at": now, "closest_task_at": None,
              "is_deleted": False, "custom_fields_values": None, "account_id": account_id}
    if kind == "leads":
        return common | {"price": 0, "status_id": 142, "pipeline_id": 1, "loss_reason_id": None,
                         "closed_at": None, "score": None, "labor_cost": None}
    if kind == "contacts":
        return common | {"first_name": "", "last_name": "", "is_unsorted": False}
    return common


def render(record: dict[str, Any], kind: str, origin: str, with_: tuple[str, ...]) -> dict[str, Any]:
    """A stored record as amoCRM answers it: fields, `_links.self`, `_embedded` with tags and asked relations."""
    fields = {k: v for k, v in record.items() if k != "_linked"}
    embedded: dict[str, Any] = {"tags": []}
    for rel in with_:
        if rel in ENTITY_TYPES and rel != kind:
            embedded[rel] = [{"id": i, "_links": self_link(origin, f"/api/v4/{rel}/{i}")}
                             for i in record["_linked"].get(rel, [])]
    return {**fields, "_links": self_link(origin, f"/api/v4/{kind}/{fields['id']}"), "_embedded": embedded}


def self_link(origin: str, path: str) -> dict[str, Any]:
    """`{"self": {"href": "<origin><path>"}}`."""
    return {"self": {"href": origin + path}}


def page_links(url: URL, origin: str, page: int, limit: int, has_next: bool) -> dict[str, Any]:
    """self/next/prev of a list page: the request's own query with `page` and `limit` set, absolute on origin."""
    kept = [(k, v) for k, v in url.query.items() if k not in ("page", "limit")]

    def href(number: int) -> dict[str, str]:
        target = URL(origin + url.path).with_query([*kept, ("page", str(number)), ("limit", str(limit))])
        return {"href": str(target)}

    links = {"self": href(page)}
    if has_next:
        links["next"] = href(page + 1)
    if page > 1:
        links["prev"] = href(page - 1)
    return links
