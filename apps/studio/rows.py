"""The adapter rows of the studio, as data (no Gradio): which adapter each of the UI's fixed row slots shows, and the
selection (tick and weight) carried by adapter identity.

The UI has `MAX_ROWS` row slots. Which adapter a slot shows changes whenever the folder is listed again (a new
adapter that sorts first shifts every row) or the filter changes, so a tick or a weight must never stay with a slot:
the *selection* maps each adapter's `identity` (its key and the hash of its weights file) to ``[enabled, weight]``,
the slots are drawn from it (`layout`), and the values the user set in the slots are folded back into it by identity
(`merge`) before every redraw and every Generate. A file rewritten on disk is another adapter: its old selection is
dropped with a note (`prune`), never applied to the new content; the mix sent to the engine carries each adapter's
hash, so the engine refuses a file that changed between the listing and the run (`models.Slot.apply_mix`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_ROWS = 24  #: row slots in the UI; the filter reaches the adapters beyond them
UNUSABLE = "unusable"  #: the group of entries that cannot be loaded (their method is not known)

Selection = dict[str, list[Any]]  #: identity -> [enabled, weight]


def identity(entry: dict[str, Any]) -> str:
    """An adapter's identity: its key (path in the folder) and its weights file's hash."""
    return f"{entry['key']}#{entry.get('sha256', '')}"


def adapters(listing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The adapters of a listing (`Studio.entries` as dicts), grouped by method (unusable ones last), by key within a
    group."""
    found = [e for e in listing if e.get("kind") == "adapter"]
    return sorted(found, key=lambda e: (not e.get("method"), e.get("method") or UNUSABLE, e["key"]))


def matches(entry: dict[str, Any], query: str) -> bool:
    """Whether an entry passes the filter: every word of ``query`` is in its key, method or badges (any case)."""
    text = f"{entry['key']} {entry.get('method', '')} {entry.get('badges', '')}".lower()
    return all(word in text for word in query.lower().split())


def merge(selection: Selection, ids: list[str], enables: list[Any], weights: list[Any]) -> Selection:
    """The selection with the values the slots show folded in by identity (slot i shows ``ids[i]``; "" is empty).

    An adapter that is neither ticked nor re-weighted is left out, so the selection stays small."""
    out = {k: list(v) for k, v in (selection or {}).items()}
    for ident, on, w in zip(ids, enables, weights):
        if not ident:
            continue
        w = 1.0 if w is None else float(w)
        if on or w != 1.0:
            out[ident] = [bool(on), w]
        else:
            out.pop(ident, None)
    return out


def prune(selection: Selection, listing: list[dict[str, Any]]) -> tuple[Selection, list[str]]:
    """The selection without the adapters that left the listing, and a note for each enabled one that left
    (deleted, or its file rewritten: a rewritten file is another adapter and is not ticked in its place)."""
    present = {identity(e) for e in adapters(listing)}
    by_key = {e["key"]: e for e in adapters(listing)}
    kept, notes = {}, []
    for ident, value in selection.items():
        if ident in present:
            kept[ident] = value
            continue
        if value[0]:
            key, _, digest = ident.rpartition("#")
            now = by_key.get(key)
            why = (f"its file changed (hash {digest} → {now.get('sha256', '')}); tick it again to use the new one"
                   if now else "it is no longer in the folder")
            notes.append(f"{key} was unticked: {why}")
    return kept, notes


@dataclass
class Slot:
    """What one row slot shows: the adapter's identity ("" for an empty slot), its label, its badges, the method
    header drawn above it ("" when it continues the group above), whether it can be ticked, and its values."""

    ident: str = ""
    label: str = ""
    info: str = ""
    header: str = ""
    usable: bool = False
    enabled: bool = False
    weight: float = 1.0


def layout(listing: list[dict[str, Any]], query: str, selection: Selection) -> tuple[list[Slot], str]:
    """The `MAX_ROWS` slots for ``listing`` filtered by ``query``, with the selection's values, and a summary line
    (how many rows are shown, and the enabled adapters, which stay in the mix while the filter hides them)."""
    shown = [e for e in adapters(listing) if matches(e, query or "")]
    slots, previous = [], None
    for e in shown[:MAX_ROWS]:
        group = e.get("method") or UNUSABLE
        on, w = selection.get(identity(e), [False, 1.0])
        slots.append(Slot(identity(e), e["key"], e.get("badges", ""), f"**{group}**" if group != previous else "",
                          not e.get("error") and not e.get("incompatible"), bool(on), float(w)))
        previous = group
    slots += [Slot() for _ in range(MAX_ROWS - len(slots))]
    total = len(adapters(listing))
    summary = f"{min(len(shown), MAX_ROWS)} of {total} adapters shown"
    if len(shown) > MAX_ROWS:
        summary += f" (the first {MAX_ROWS} of {len(shown)} matching: type in the filter to narrow)"
    enabled = [(ident.rpartition("#")[0], v[1]) for ident, v in selection.items() if v[0]]
    if enabled:
        summary += " · enabled: " + ", ".join(f"{k} {w:g}" for k, w in enabled)
    return slots, summary


def mix(selection: Selection) -> list[dict[str, Any]]:
    """The mix the engine gets: each enabled adapter's key, weight and the hash it was selected with."""
    out = []
    for ident, (on, w) in selection.items():
        if on:
            key, _, digest = ident.rpartition("#")
            out.append({"key": key, "weight": float(w), "sha256": digest})
    return out


def from_mix(listing: list[dict[str, Any]], items: list[dict[str, Any]]) -> tuple[Selection, list[str]]:
    """A selection holding exactly ``items`` ({key, weight, optional hash}: a saved mix, or an image's infotext),
    each mapped to the listed adapter of that key; keys not listed, and hashes that differ, are named in the notes."""
    by_key = {e["key"]: e for e in adapters(listing)}
    selection, notes = {}, []
    for item in items:
        e = by_key.get(item["key"])
        if e is None:
            notes.append(f"{item['key']} is not in the listing; press 'Refresh folder'")
            continue
        if item.get("hash") and item["hash"] != e.get("sha256"):
            notes.append(f"{item['key']} changed since (hash {item['hash']} → {e.get('sha256', '')}): the current "
                         "file is ticked")
        selection[identity(e)] = [True, float(item["weight"])]
    return selection, notes
