"""Test doubles for ldapsync: a fake Microsoft 365 tenant (``tenant.FakeTenant``).

Never imported by production code at module level (a test enforces it); only tests and an explicit
demo mode (lazily, inside a function) may use it. Start with ``ldapsync.testing.tenant``'s docstring.
"""
