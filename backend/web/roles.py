"""Who may use each path of the JSON API (docs/DESIGN.md §7): :data:`ACCESS`, one table from
method and path template to the roles allowed. A route of the API that the table does not
declare is refused to everyone (403).

- ``operator``: everything (also the ``api_token`` setting, and anyone while no credential is
  configured).
- ``partner``: the catalogue, every wallet, redemptions for any driver; never the devices, nor
  the log's operator endpoint ``/api/checkpoint``.
- ``driver``: a token made for one driver: the paths scoped to that driver, where the path
  parameter that :attr:`Access.own` names is the driver's account or id, and the paths open to
  every role (the catalogue, the OpenAPI document).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

OPERATOR, PARTNER, DRIVER = "operator", "partner", "driver"
ROLES = (OPERATOR, PARTNER, DRIVER)


@dataclass(frozen=True)
class Access:
    """The roles that may use one method of one path; for a driver, ``own`` is the path parameter
    and the value it must have, ``{id}`` standing for the driver's id."""

    roles: frozenset[str]
    own: tuple[str, str] | None = None

    def allows(self, role: str, driver: str | None, params: Mapping[str, object]) -> bool:
        if role not in self.roles:
            return False
        if role != DRIVER or self.own is None:
            return True
        name, value = self.own
        return driver is not None and params.get(name) == value.replace("{id}", driver)

    def describe(self) -> list[str]:
        """The roles, a scoped driver written as what its parameter must be."""
        return [f"{DRIVER} (only where {self.own[0]} is {self.own[1].replace('{id}', '<its id>')})"
                if role == DRIVER and self.own is not None else role
                for role in ROLES if role in self.roles]


_OPERATOR = Access(frozenset({OPERATOR}))
_EVERY_ROLE = Access(frozenset(ROLES))
_OWN_ACCOUNT = Access(frozenset(ROLES), ("account", "driver:{id}"))
_OWN_ID = Access(frozenset(ROLES), ("id", "{id}"))

#: (method, path template under ``/api``) -> who may use it.
ACCESS: Mapping[tuple[str, str], Access] = MappingProxyType({
    ("GET", "/api/devices"): _OPERATOR,
    ("GET", "/api/devices/{dev}"): _OPERATOR,
    ("GET", "/api/devices/{dev}/records"): _OPERATOR,
    ("POST", "/api/devices/{dev}/approve"): _OPERATOR,
    ("POST", "/api/devices/{dev}/revoke"): _OPERATOR,
    ("POST", "/api/devices/{dev}/clear"): _OPERATOR,
    ("GET", "/api/vehicles/{vin}/mileage"): _OPERATOR,
    ("GET", "/api/catalogue"): _EVERY_ROLE,
    ("GET", "/api/drivers/{id}"): _OWN_ID,
    ("GET", "/api/wallets/{account}"): _OWN_ACCOUNT,
    ("POST", "/api/wallets/{account}/redeem"): _OWN_ACCOUNT,
    ("GET", "/api/checkpoint"): _OPERATOR,
    ("GET", "/api/openapi.json"): _EVERY_ROLE,
})


def access(method: str, path: str) -> Access | None:
    """The declaration of ``method`` on ``path`` (HEAD as GET), or None: refused to everyone."""
    return ACCESS.get(("GET" if method == "HEAD" else method, path))
