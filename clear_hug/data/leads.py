"""The canonical 12-lead order and lead-name matching.

Every array in the data pipeline that has a lead axis uses the order below, so that lead index 0 is always
lead I and index 11 is always V6, whatever order the source file stored them in. Sources spell lead names
differently (PTB-XL writes ``AVR``, the PTB Diagnostic database writes ``avr``, MIT-BIH uses ``MLII``), so
names are matched case-insensitively, after a few well-known aliases are resolved.
"""

from __future__ import annotations

from collections.abc import Sequence

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
NUM_LEADS = len(LEADS)

# Lower-cased name -> canonical index. Aliases are names that denote the same physical lead: MIT-BIH's
# "modified lead II" is recorded like lead II and is the lead its annotators used.
_INDEX: dict[str, int] = {name.lower(): i for i, name in enumerate(LEADS)}
_ALIASES = {"mlii": "ii", "mli": "i", "mliii": "iii", "lead i": "i", "lead ii": "ii", "lead iii": "iii"}


def normalize_lead_name(name: str) -> str:
    """Lower-cased, stripped form of a lead name with aliases resolved (``"AVR " -> "avr"``)."""
    key = str(name).strip().lower()
    return _ALIASES.get(key, key)


def lead_index(name: str) -> int | None:
    """Canonical index of a lead name (case-insensitive), or None for a lead that is not one of the 12."""
    return _INDEX.get(normalize_lead_name(name))


def map_leads(names: Sequence[str]) -> list[int | None]:
    """For each name in a file's lead list, its canonical index (None for leads outside the 12).

    When a file holds the same lead twice (it happens with hand-made headers), only the first keeps its
    index, so one canonical row is never written from two source channels.
    """
    seen = set()
    out: list[int | None] = []
    for name in names:
        idx = lead_index(name)
        if idx is not None and idx in seen:
            idx = None
        if idx is not None:
            seen.add(idx)
        out.append(idx)
    return out
