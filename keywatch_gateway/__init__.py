"""The gateway side of keywatch: report calls, check keys, enforce at the edge.

Imports no ML library (and nothing from the service packages), so a gateway installs
only this package and its HTTP dependencies.
"""

from keywatch_gateway.client import KeywatchClient
from keywatch_gateway.middleware import KeywatchMiddleware

__all__ = ["KeywatchClient", "KeywatchMiddleware"]
