"""Router plugins: finding a factory by name and making checked routers.

This module owns plugin discovery.  A router plugin is a Twisted plugin: a
module in a ``twisted/plugins/`` directory on the Python path (no
``__init__.py`` there) that holds an object providing both
``twisted.plugin.IPlugin`` and ``relay.interfaces.IRouterFactory``.  A
``[[routes]]`` entry selects it with ``plugin = "NAME"``, matched against the
factory's ``name``; nothing is guessed from module or file names.

Every factory found and every router it makes is checked with zope.interface's
``verifyObject``, so a broken plugin stops start-up with one clear line
instead of failing on the first message.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from relay.log import Logger
from twisted.plugin import getPlugins
from zope.interface import Invalid
from zope.interface.verify import verifyObject

from relay.config_values import ConfigError
from relay.interfaces import IRouter, IRouterFactory

__all__ = [
    "OptionError",
    "PluginError",
    "UnknownPluginError",
    "available_factories",
    "find_router_factory",
    "make_router",
]

log = Logger()


class PluginError(ConfigError):
    """A plugin cannot be used; ``str(error)`` is one line for the operator.

    A ``ConfigError``: start-up stops on it.  ``build_chain`` prefixes the
    file and ``routes[i].plugin``.
    """


class UnknownPluginError(PluginError, LookupError):
    """No router plugin has the requested name."""

    def __init__(self, name: str, found: Iterable[str]) -> None:
        self.name = name
        self.found = tuple(sorted(found))
        listing = ", ".join(self.found) if self.found else "none"
        super().__init__(f'no router plugin named "{name}" (found: {listing})')


class OptionError(ValueError):
    """A bad option of a ``[[routes]]`` entry; ``option`` names the key.

    Factories may raise it (or any ValueError whose text starts with
    ``"key: "``) from ``makeRouter``; start-up then names ``routes[i].key``.
    """

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(message)


def available_factories(package: Optional[Any] = None) -> list[Any]:
    """Every installed object providing IRouterFactory, in discovery order."""
    return list(getPlugins(IRouterFactory, package))


def find_router_factory(name: str, package: Optional[Any] = None) -> Any:
    """The router factory whose ``name`` is ``name``, checked with verifyObject.

    ``package`` is the plugin package to search (default ``twisted.plugins``).
    Raises ``UnknownPluginError`` listing the names found, or ``PluginError``
    when the factory does not fully provide IRouterFactory.
    """
    factories = available_factories(package)
    matches = [f for f in factories if getattr(f, "name", None) == name]
    if not matches:
        raise UnknownPluginError(name, (str(getattr(f, "name", "?")) for f in factories))
    if len(matches) > 1:
        log.warn(
            "{count} router plugins are named {name}; using the first ({factory!r})",
            count=len(matches),
            name=name,
            factory=matches[0],
        )
    factory = matches[0]
    _verify(IRouterFactory, factory, f'plugin "{name}"')
    return factory


def make_router(factory: Any, options: dict[str, Any], domains: Any, config: Any) -> Any:
    """``factory.makeRouter(...)``, checking the result provides IRouter.

    A ValueError from the factory (a bad option) passes through unchanged.
    """
    router = factory.makeRouter(options, domains, config)
    label = f'router made by plugin "{getattr(factory, "name", factory)}"'
    _verify(IRouter, router, label)
    return router


def _verify(interface: Any, candidate: Any, label: str) -> None:
    try:
        verifyObject(interface, candidate)
    except Invalid as e:
        reason = " ".join(str(e).split())
        raise PluginError(f"{label} does not provide {interface.__name__}: {reason}") from None
