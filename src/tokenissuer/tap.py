"""The module twistd's plugin points at: the options and the service maker."""

from tokenissuer.config import IssuerOptions as Options
from tokenissuer.service import makeService

__all__ = ["Options", "makeService"]
