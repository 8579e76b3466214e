"""tokenissuer: turn a verified TLS client certificate into a short-lived signed JWT."""

__version__ = "0.1.0"
