"""Usage accounting: one record per authenticated request, on disk before its response
ends (``journal``), moved into the database by one writer (``writer``), summed into
rollups that reports read (``store.usage``). See docs/usage.md."""

from .exchange import Exchange, client_request_id
from .journal import Journal
from .touches import KeyTouches
from .writer import DeadLetters, UsageWriter

__all__ = ["DeadLetters", "Exchange", "Journal", "KeyTouches", "UsageWriter",
           "client_request_id"]
