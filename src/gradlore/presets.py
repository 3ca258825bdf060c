"""``gradlore.presets``: kept for scripts that import it; the presets live beside the optimizer."""

from gradlore.optim.presets import PRESETS, dct, dct_fira, dct_galore, fira, frugal, galore, names  # noqa: F401
