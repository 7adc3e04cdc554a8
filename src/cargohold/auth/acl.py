"""Access rules: who may pull which repositories of which upstream, and who gets in without a login."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from cargohold.config import AccessRule, AuthConfig
from cargohold.identity import ClientAddress, Identity, IPNetwork, within

ANY_USER = "*"


def _rule_matches_who(rule: AccessRule, who: Identity) -> bool:
    if not rule.users and not rule.groups:
        return True  # a rule for everyone let in, anonymous clients too
    if who.user is None:
        return False
    return ANY_USER in rule.users or who.user in rule.users or not who.groups.isdisjoint(rule.groups)


def _rule_matches_what(rule: AccessRule, upstream: str, repository: str, action: str) -> bool:
    return (
        action in rule.actions
        and fnmatchcase(upstream, rule.upstream)
        and any(fnmatchcase(repository, pattern) for pattern in rule.repositories)
    )


class Acl:
    """Grants are a union: a request is allowed when any rule allows it.

    Without rules every logged-in user (and every anonymous client let in) may pull everything,
    as with the htpasswd-only set-ups cargohold replaces.
    """

    def __init__(
        self,
        rules: Sequence[AccessRule] | None,
        anonymous: bool | Sequence[IPNetwork],
        groups: Mapping[str, Sequence[str]],
    ) -> None:
        self._rules = list(rules) if rules is not None else [AccessRule()]
        self._anonymous_all = anonymous is True
        self._anonymous_nets = [] if isinstance(anonymous, bool) else list(anonymous)
        self._groups = {name: frozenset(members) for name, members in groups.items()}

    @classmethod
    def from_config(cls, config: AuthConfig) -> Acl:
        return cls(config.rules, config.anonymous, config.groups)

    def anonymous_allowed(self, address: ClientAddress) -> bool:
        """Whether a client without credentials gets in (dockerd's registry-mirrors never sends any).

        A client a proxy forwarded for without a usable address is inside no network."""
        return self._anonymous_all or within(address, self._anonymous_nets)

    def groups_of(self, user: str) -> frozenset[str]:
        return frozenset(name for name, members in self._groups.items() if user in members)

    def allows_everything(self, who: Identity) -> bool:
        """Whether some rule lets `who` pull every repository of every upstream (no rules: everyone let in)."""
        return any(
            _rule_matches_who(rule, who)
            and "pull" in rule.actions
            and rule.upstream == "*"
            and "*" in rule.repositories
            for rule in self._rules
        )

    def allows(self, who: Identity, upstream: str, repository: str, action: str = "pull") -> bool:
        return any(
            _rule_matches_who(rule, who) and _rule_matches_what(rule, upstream, repository, action)
            for rule in self._rules
        )
