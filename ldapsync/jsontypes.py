"""JSON as Python types: what Microsoft Graph answers and sends, and what an outbox row holds.

The values really are arbitrary JSON (str, int, float, bool, None, lists, objects), hence
``Any``: a recursive JSON type would make every read of a Graph property a cast.
"""

from __future__ import annotations

from typing import Any, TypeAlias

JSONObject: TypeAlias = dict[str, Any]
"""A decoded JSON object (a Graph user, a PATCH body, a queued row's fields)."""
