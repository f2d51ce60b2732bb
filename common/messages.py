"""Reading a Flower RecordDict without its typed views.

`content.config_records` (and `array_records`, `metric_records`) builds a new type-checked dict of every
record of that kind on each access, about 5 us; the round loop, the checks and the client mods read records
some 1,500 times a round at 50 train and 50 evaluate clients. These read the one record asked for.
"""

from __future__ import annotations

from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)


def get_record(content: RecordDict, name: str, kind: type[R]) -> R | None:
    """content[name] if it is a record of this kind, else None (absent, or a record of another kind)."""
    found = content.get(name)
    return found if isinstance(found, kind) else None


def get_records(content: RecordDict, kind: type[R]) -> list[tuple[str, R]]:
    """Every (name, record) of this kind, in the content's order."""
    return [(name, found) for name, found in content.items() if isinstance(found, kind)]
