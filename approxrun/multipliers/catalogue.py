"""The packaged multiplier catalogue: ``conf/multiplier/*.yaml`` (``file``, a LUT file; ``auto``) and
the EvoApproxLib circuits bundled with approxrun, with their published figures
(``evoapprox_data/catalogue.json``). Any other name resolves without an entry."""

from __future__ import annotations

import functools
from importlib import resources

import yaml


@functools.cache
def catalogue_entries() -> dict[str, dict]:
    """name -> config entry; an entry without a plain name (e.g. ``file``) is keyed by its file name."""
    folder = resources.files("approxrun.conf").joinpath("multiplier")
    entries = {}
    for item in sorted(folder.iterdir(), key=lambda i: i.name):
        if item.name.endswith(".yaml"):
            entry = yaml.safe_load(item.read_text()) or {}
            name = entry.get("name")
            entries[name if isinstance(name, str) and "${" not in name else item.name[:-5]] = entry
    from approxrun.multipliers.bundled import Bundle, catalogue_entry  # bundled imports the importer, which imports us

    for name, entry in Bundle.packaged().catalogue().items():
        entries.setdefault(name, catalogue_entry(entry))
    return entries
