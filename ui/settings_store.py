"""The Settings tab's view of the one options store (`ldm_core.options`), shared with `/sdapi/v1/options`.

The store, its keys, types, ranges and when each applies live in `ldm_core.options` so that the UI and the
API (which may not import each other) read and write the same `config.json`. This module keeps the names the
UI code uses: `SETTINGS` are the options shown in the Settings tab.
"""

from __future__ import annotations

from ldm_core.options import (
    APPLIES_TEXT,
    LIVE_FIELDS,
    OPTIONS,
    OPTIONS_BY_KEY,
    Option,
    OptionError,
    OptionsStore,
    coerce,
    config_from_options,
    effective_applies,
    live_config,
)

Setting = Option
SettingsStore = OptionsStore
config_from_settings = config_from_options
#: The options the Settings tab shows (read-only ones, such as the checkpoint hash, are left out).
SETTINGS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.ui and not o.readonly)
SETTINGS_BY_KEY: dict[str, Option] = OPTIONS_BY_KEY

__all__ = [
    "APPLIES_TEXT",
    "LIVE_FIELDS",
    "SETTINGS",
    "SETTINGS_BY_KEY",
    "OptionError",
    "Setting",
    "SettingsStore",
    "coerce",
    "config_from_settings",
    "effective_applies",
    "live_config",
]
