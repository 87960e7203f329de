"""Loaded by schemathesis's runner in the fuzzing tier (``SCHEMATHESIS_HOOKS``)."""
