"""paragate: an LLM gateway for self-hosted vLLM fleets (Paradigm API v2 completions)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
