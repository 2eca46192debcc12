"""The Python client, where users look for it: `from ticketserve.client import Client`.
Everything lives in ticketserve.runtime.client (its `__all__`: the clients, their results and
the typed errors); this module only names it."""

from ticketserve.runtime.client import *  # noqa: F403
from ticketserve.runtime.client import __all__  # noqa: F401
