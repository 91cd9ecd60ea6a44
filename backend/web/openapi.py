"""The OpenAPI 3.1 document of the JSON API, written by hand (served at ``/api/openapi.json``).

Each ``/api`` operation's ``security`` names the roles that may use it, from
:data:`backend.web.roles.ACCESS` (OpenAPI 3.1 lets a bearer scheme list role names); a driver's
scope is in ``x-driver-parameter``.
"""

from __future__ import annotations

from typing import Any

from backend.records.devices import MAX_RECORDS_PAGE
from backend.web import roles


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERR = {"$ref": "#/components/responses/Error"}
_INT = {"type": "integer"}
_INT_OR_NULL = {"type": ["integer", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}
_DEV = {"name": "dev", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}, "description": "device id"}
_ACCOUNT = {"name": "account", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "driver:<id>, unassigned:<dev>, issuer or redeemed:<item>"}
_DRIVER = {"name": "id", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"},
           "description": "driver id"}

_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Device": {
        "type": "object",
        "required": ["dev", "vin", "status", "last_seq", "last_seen", "odo_m", "accepted", "rejected",
                     "backlog", "online"],
        "properties": {
            "dev": {"type": "string"}, "vin": _STR_OR_NULL,
            "status": {"enum": ["pending", "approved", "revoked", "retired", "rejected"]},
            "last_seq": {**_INT, "description": "highest seq with every seq up to it stored"},
            "last_seen": {**_INT_OR_NULL, "description": "Unix ms of the last message"},
            "odo_m": {**_INT_OR_NULL, "description": "last accepted odometer, metres"},
            "accepted": _INT, "rejected": _INT,
            "backlog": {**_INT_OR_NULL, "description": "records waiting on the agent, as it last said"},
            "online": {"type": "boolean"},
            "flagged_vin": {**_STR_OR_NULL, "description": "a VIN that waits for an operator's approval"},
            "held_since": {**_INT_OR_NULL, "description": "flagged (a rollback) since: rewards held"},
            "held_reason": {**_STR_OR_NULL, "description": "why the device is flagged"},
        },
    },
    "DeviceDetail": {"allOf": [_ref("Device"), {"type": "object", "properties": {
        "pub": {"type": "string", "description": "raw Ed25519 public key, base64url"},
        "enrollment": {"type": "object", "description": "the enrolment (the fleet token withheld)"},
        "status_message": {"type": ["object", "null"]},
    }}]},
    "Record": {
        "type": "object", "required": ["seq", "id", "kind", "t", "odo_m", "status", "reason"],
        "properties": {
            "seq": _INT, "id": {"type": "string"},
            "kind": {"enum": ["odometer", "trip", "confirmation", "event"]},
            "t": {**_INT, "description": "as signed, Unix ms"},
            "t_est": {**_INT, "description": "best estimate of the wall time, Unix ms"},
            "clock": {"enum": ["synced", "unsynced"]}, "odo_m": _INT_OR_NULL, "vin": _STR_OR_NULL,
            "status": {"enum": ["accepted", "rejected"]}, "reason": _STR_OR_NULL,
        },
    },
    "Transfer": {
        "type": "object",
        "properties": {"id": _INT, "key": {"type": "string"}, "from_account": {"type": "string"},
                       "to_account": {"type": "string"}, "amount": {**_INT, "description": "milli-tokens"},
                       "rule_id": _STR_OR_NULL, "rules_version": _STR_OR_NULL, "dev": _STR_OR_NULL,
                       "record_id": _STR_OR_NULL, "week": _STR_OR_NULL, "memo": _STR_OR_NULL,
                       "created_at": _INT},
    },
    "Wallet": {"type": "object", "required": ["account", "balance", "transfers"],
               "properties": {"account": {"type": "string"},
                              "balance": {**_INT, "description": "milli-tokens"},
                              "transfers": {"type": "array", "items": _ref("Transfer")}}},
    "DriverWallet": {"allOf": [_ref("Wallet"), {"type": "object", "required": ["id", "name"], "properties": {
        "id": {"type": "string"}, "name": _STR_OR_NULL}}]},
    "Catalogue": {"type": "object", "required": ["rules_version", "items"],
                  "properties": {"rules_version": {"type": "string", "description": "the rules in force"},
                                 "items": {"type": "array", "items": {
                                     "type": "object", "required": ["item", "milli_tokens"],
                                     "properties": {"item": {"type": "string"},
                                                    "milli_tokens": {**_INT, "description": "its price"}}}}}},
    "Checkpoint": {"type": "object", "required": ["origin", "size", "root", "t", "note", "cosignatures"],
                   "properties": {"origin": {"type": "string", "description": "the log's name"},
                                  "size": _INT, "root": {"type": "string", "description": "hex"},
                                  "t": _INT, "cosignatures": _INT,
                                  "note": {"type": "string", "description":
                                           "c2sp.org/tlog-checkpoint note, signed by the log key and "
                                           "cosigned by witnesses (also at /log/checkpoint)"}}},
}


def _secured(paths: dict[str, Any]) -> dict[str, Any]:
    """Each ``/api`` operation with the roles :data:`roles.ACCESS` lets use it, and its 403."""
    for path, operations in paths.items():
        if not path.startswith("/api/"):
            continue
        for method, op in operations.items():
            declared = roles.access(method.upper(), path)
            names = [] if declared is None else [r for r in roles.ROLES if r in declared.roles]
            op["security"] = [{"bearer": names}]
            op["x-roles"] = [] if declared is None else declared.describe()
            if declared is not None and declared.own is not None:
                op["x-driver-parameter"] = {"name": declared.own[0], "value": declared.own[1]}
            op["responses"].setdefault("403", _ERR)
    return paths


def document() -> dict[str, Any]:
    dev_ok = _json(_ref("DeviceDetail"), "the device")
    return {
        "openapi": "3.1.0",
        "info": {"title": "odoledger backend API", "version": "1",
                 "description": "Devices, records, wallets and the transparency log's checkpoint. "
                                "Amounts are milli-tokens, distances metres, times Unix milliseconds."},
        "security": [{"bearer": []}],
        "paths": _secured({
            "/api/devices": {"get": {"summary": "every device", "operationId": "listDevices",
                                     "responses": {"200": _json({"type": "array", "items": _ref("Device")},
                                                                "the devices"), "401": _ERR}}},
            "/api/devices/{dev}": {"get": {
                "summary": "one device, with its key and enrolment", "operationId": "getDevice",
                "parameters": [_DEV], "responses": {"200": dev_ok, "401": _ERR, "404": _ERR}}},
            "/api/devices/{dev}/records": {"get": {
                "summary": "a device's stored records, ascending seq", "operationId": "listRecords",
                "parameters": [
                    _DEV,
                    {"name": "after_seq", "in": "query", "schema": {**_INT, "minimum": 0, "default": 0}},
                    {"name": "limit", "in": "query",
                     "schema": {**_INT, "minimum": 1, "maximum": MAX_RECORDS_PAGE, "default": 500}}],
                "responses": {"200": _json({"type": "array", "items": _ref("Record")}, "the records"),
                              "400": _ERR, "401": _ERR, "404": _ERR}}},
            "/api/devices/{dev}/approve": {"post": {
                "summary": "approve a device (for the VIN it was flagged with, or the one given)",
                "operationId": "approveDevice", "parameters": [_DEV],
                "requestBody": {"required": False, "content": {"application/json": {"schema": {
                    "type": "object", "properties": {
                        "vin": {"type": "string"},
                        "replace": {"type": "boolean", "default": False,
                                    "description": "retire the vehicle's active device"}}}}}},
                "responses": {"200": dev_ok, "400": _ERR, "401": _ERR, "404": _ERR}}},
            "/api/devices/{dev}/revoke": {"post": {
                "summary": "revoke a device", "operationId": "revokeDevice", "parameters": [_DEV],
                "responses": {"200": dev_ok, "401": _ERR, "404": _ERR}}},
            "/api/devices/{dev}/clear": {"post": {
                "summary": "clear a device's rollback flag; the rewards held since are credited",
                "operationId": "clearDevice", "parameters": [_DEV],
                "responses": {"200": dev_ok, "400": _ERR, "401": _ERR, "404": _ERR}}},
            "/api/vehicles/{vin}/mileage": {"get": {
                "summary": "a vehicle's mileage per month or ISO week, against its lease allowance (JSON, or "
                           "CSV with format=csv or Accept: text/csv)",
                "operationId": "getMileage",
                "parameters": [
                    {"name": "vin", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "from", "in": "query", "required": True, "schema": {"type": "string"},
                     "description": "ISO 8601 date or time (UTC unless it names a zone)"},
                    {"name": "to", "in": "query", "required": True, "schema": {"type": "string"},
                     "description": "ISO 8601, not included; at most ten years after from"},
                    {"name": "per", "in": "query", "schema": {"enum": ["month", "week"], "default": "month"}},
                    {"name": "unit", "in": "query", "schema": {"enum": ["km", "mi"]}},
                    {"name": "format", "in": "query", "schema": {"enum": ["json", "csv"]}}],
                "responses": {"200": _json({"type": "object", "required": ["vin", "per", "unit", "from", "to",
                                                                           "columns", "periods"],
                                            "properties": {"total_distance_m": _INT,
                                                           "allowance_per_year_m": _INT_OR_NULL}},
                                           "the periods (or text/csv)"),
                              "400": _ERR, "401": _ERR, "404": _ERR}}},
            "/api/catalogue": {"get": {
                "summary": "the items a driver can redeem and their prices, from the rules in force",
                "operationId": "getCatalogue",
                "responses": {"200": _json(_ref("Catalogue"), "the catalogue"), "401": _ERR, "503": _ERR}}},
            "/api/drivers/{id}": {"get": {
                "summary": "a driver and their wallet: balance and transfers, newest first",
                "operationId": "getDriver", "parameters": [_DRIVER],
                "responses": {"200": _json(_ref("DriverWallet"), "the driver's wallet"), "401": _ERR,
                              "404": _ERR}}},
            "/api/wallets/{account}": {"get": {
                "summary": "an account's balance and transfers, newest first", "operationId": "getWallet",
                "parameters": [_ACCOUNT],
                "responses": {"200": _json(_ref("Wallet"), "the wallet"), "401": _ERR, "404": _ERR}}},
            "/api/wallets/{account}/redeem": {"post": {
                "summary": "redeem a catalogue item; the same idempotency key returns the same transfer",
                "operationId": "redeem", "parameters": [_ACCOUNT],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["item", "idempotency_key"], "additionalProperties": False,
                    "properties": {"item": {"type": "string"}, "idempotency_key": {"type": "string"}}}}}},
                "responses": {"200": _json(_ref("Transfer"), "the redemption"), "400": _ERR, "401": _ERR,
                              "404": _ERR, "409": _ERR, "503": _ERR}}},
            "/api/checkpoint": {"get": {
                "summary": "the transparency log's latest checkpoint (a new one if the log has grown)",
                "operationId": "getCheckpoint",
                "responses": {"200": _json(_ref("Checkpoint"), "the checkpoint"), "401": _ERR}}},
            "/api/openapi.json": {"get": {"summary": "this document", "operationId": "openapi",
                                          "responses": {"200": {"description": "OpenAPI 3.1"}, "401": _ERR}}},
            "/log/checkpoint": {"get": {
                "summary": "the log's latest checkpoint (c2sp.org/tlog-checkpoint) with its cosignatures",
                "security": [], "operationId": "logCheckpoint",
                "responses": {"200": {"description": "text/plain; charset=utf-8: a signed note"}}}},
            "/log/tile/{path}": {"get": {
                "summary": "hash tiles <L>/<N>[.p/<W>] and entry bundles entries/<N>[.p/<W>] (tlog-tiles)",
                "security": [], "operationId": "logTile",
                "parameters": [{"name": "path", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "application/octet-stream"},
                              "404": {"description": "no such tile within the latest checkpoint"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format)", "security": [],
                                 "operationId": "metrics",
                                 "responses": {"200": {"description": "text/plain; version=0.0.4"}}}},
            "/healthz": {"get": {"summary": "liveness", "security": [], "operationId": "healthz",
                                 "responses": {"200": _json({"type": "object"}, "alive"),
                                               "503": _ERR}}},
        }),
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "an API token (odo-backend api-tokens add NAME --role ROLE), or the "
                               "api_token setting (--api-token, an operator's); needed on every /api path "
                               "once either exists. Each operation's security lists the roles that may use "
                               "it; a driver's token only where x-driver-parameter names its own account or "
                               "id. 401: no token that works (missing, unknown, expired, revoked); 403: the "
                               "token's role may not use the path"}},
            "schemas": _SCHEMAS,
            "responses": {"Error": _json(_ref("Error"), "what was wrong")},
        },
    }
