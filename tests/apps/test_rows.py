"""The adapter rows as data (apps/studio/rows.py): the selection follows adapters, not row slots."""

from __future__ import annotations

from apps.studio import rows


def _entry(key: str, method: str, sha: str = "aaaa", error: str = "") -> dict:
    return {"key": key, "kind": "adapter", "method": method, "sha256": sha, "badges": f"{method} · base sd",
            "error": error}


LISTING = [_entry("labs/style", "lora", "11"), _entry("labs/erase", "spm", "22"), _entry("labs/edges", "csc", "33"),
           {"key": "m/x.mix.json", "kind": "bundle", "method": "mix", "sha256": "44", "badges": "", "error": ""}]


def _ticked(slots: list[rows.Slot]) -> dict[str, tuple[bool, float]]:
    return {s.label: (s.enabled, s.weight) for s in slots if s.ident}


def test_a_new_adapter_that_sorts_first_takes_no_tick():
    slots, _ = rows.layout(LISTING, "", {})
    ids = [s.ident for s in slots]
    enables = [s.label in ("labs/style", "labs/erase") for s in slots]
    weights = [{"labs/style": 0.7, "labs/erase": 0.4}.get(s.label, 1.0) for s in slots]
    selection = rows.merge({}, ids, enables, weights)
    grown = [_entry("aaa/first", "lora", "55"), *LISTING]
    selection, notes = rows.prune(selection, grown)
    slots, summary = rows.layout(grown, "", selection)
    assert _ticked(slots) == {"aaa/first": (False, 1.0), "labs/style": (True, 0.7), "labs/erase": (True, 0.4),
                              "labs/edges": (False, 1.0)}
    assert notes == [] and "enabled: labs/style 0.7, labs/erase 0.4" in summary
    assert rows.mix(selection) == [{"key": "labs/style", "weight": 0.7, "sha256": "11"},
                                   {"key": "labs/erase", "weight": 0.4, "sha256": "22"}]


def test_rows_are_grouped_by_method_with_one_header_per_group():
    listing = [_entry("b", "lora"), _entry("a", "spm"), _entry("c", "lora"), _entry("bad", "", error="broken")]
    slots, _ = rows.layout(listing, "", {})
    assert [(s.label, s.header) for s in slots if s.ident] == [("b", "**lora**"), ("c", ""), ("a", "**spm**"),
                                                                ("bad", "**unusable**")]
    assert [s.usable for s in slots if s.ident] == [True, True, True, False]
    assert len(slots) == rows.MAX_ROWS and not any(s.ident for s in slots[4:])


def test_the_filter_hides_rows_not_selections():
    selection = {rows.identity(LISTING[0]): [True, 0.5]}
    slots, summary = rows.layout(LISTING, "SPM", selection)
    assert [s.label for s in slots if s.ident] == ["labs/erase"]
    assert "1 of 3 adapters shown" in summary and "enabled: labs/style 0.5" in summary
    # the hidden row's slot values are not folded in (the slot shows another adapter now)
    selection = rows.merge(selection, [s.ident for s in slots], [s.enabled for s in slots], [1.0] * rows.MAX_ROWS)
    assert rows.mix(selection) == [{"key": "labs/style", "weight": 0.5, "sha256": "11"}]
    many = [_entry(f"k{i:02d}", "lora") for i in range(30)]
    assert "the first 24 of 30 matching" in rows.layout(many, "", {})[1]


def test_a_rewritten_file_is_another_adapter():
    selection = {rows.identity(LISTING[0]): [True, 0.5], rows.identity(LISTING[2]): [True, 1.0]}
    rewritten = [_entry("labs/style", "lora", "99"), LISTING[1]]  # style rewritten, edges deleted
    kept, notes = rows.prune(selection, rewritten)
    assert kept == {} and rows.mix(kept) == []
    assert notes == ["labs/style was unticked: its file changed (hash 11 → 99); tick it again to use the new one",
                     "labs/edges was unticked: it is no longer in the folder"]


def test_a_loaded_mix_replaces_the_selection():
    selection, notes = rows.from_mix(LISTING, [{"key": "labs/edges", "weight": 0.3}, {"key": "gone", "weight": 1}])
    assert selection == {"labs/edges#33": [True, 0.3]}
    assert notes == ["gone is not in the listing; press 'Refresh folder'"]


def test_an_infotext_hash_that_differs_is_named():
    selection, notes = rows.from_mix(LISTING, [{"key": "labs/style", "weight": 0.8, "hash": "ff"}])
    assert selection == {"labs/style#11": [True, 0.8]}
    assert notes == ["labs/style changed since (hash ff → 11): the current file is ticked"]
