"""The one plugin seam: routers, and the factories that make them from config.

Routers decide and never connect.  ``IRouter.route`` returns a frozen
``relay.envelope.Route``, or None for "no opinion", synchronously or as a
Deferred.  The chain in ``relay.routing`` asks each router in turn; the
first answer that is not None wins.

A plugin is a Twisted plugin (a module in any ``twisted/plugins/`` package on
the path) providing ``IRouterFactory``; ``[[routes]]`` entries select it with
``plugin = "NAME"`` and pass their other keys as options.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRouter(Interface):
    """Decides the route of one recipient."""

    def route(recipient, context):
        """Return a Route, None (no opinion), or a Deferred firing with either.

        @param recipient: the ``relay.envelope.Recipient`` to route.
        @param context: a ``relay.routing.RouteContext`` (sender, client,
            authenticated user, message size, the relay's hostname).
        """


class IRouterFactory(Interface):
    """Makes routers from a ``[[routes]]`` entry; what plugins provide."""

    name = Attribute("The name used in config: plugin = \"NAME\".")

    def makeRouter(options, domains, config):
        """Return an IRouter for one ``[[routes]]`` entry.

        @param options: the entry's own keys (all but ``domains`` and
            ``plugin``) as a dict.
        @param domains: a ``relay.domains.DomainSet`` of the entry's patterns;
            the chain only asks the router about recipients that match it.
        @param config: the whole ``relay.config.Config``.
        @raise ValueError: bad options; its text names the option.
        """
