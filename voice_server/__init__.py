"""The voicebook server: Starlette app, Twilio edge, call engine and CLI."""

__version__ = "0.1.0"
