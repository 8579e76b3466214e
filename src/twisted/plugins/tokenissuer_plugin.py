"""twistd plugin: C{twistd -n tokenissuer [options]}."""

from twisted.application.service import ServiceMaker

tokenissuer = ServiceMaker(
    "tokenissuer",
    "tokenissuer.tap",
    "Issue short-lived JWTs to clients that present a verified TLS client certificate.",
    "tokenissuer",
)
