"""Projectors and refresh rules, registered with the options they read. Registration is explicit, one line each."""

from __future__ import annotations

from gradlore.projectors.base import Context, Identity, Projector, is_transposed, orient
from gradlore.projectors.dct import DCT_BASES, ColumnsProjector, DCTProjector, dct_basis
from gradlore.projectors.quantized import Int4SVDProjector
from gradlore.projectors.random import RandomProjector
from gradlore.projectors.refresh import Every, Lazy
from gradlore.projectors.svd import SVDProjector
from gradlore.registry import Option, Registry, positive_int

SCORE_NORM = Option("l1", choices=("l1", "l2"), doc="norm of each basis direction's score ‖Qᵀ G‖ (selection)")
DCT_METHOD = Option("auto", choices=("auto", "matmul", "fft", "scipy"),
                    doc="how Qᵀ G is computed; auto: scipy on CPU, else matmul below 2048 rows and FFT above")
GAP = positive_int("refresh the subspace every N steps (the first refresh is at step 0)", 200)

PROJECTORS = Registry("projector")
PROJECTORS.add("svd", SVDProjector)
PROJECTORS.add("svd-int4", Int4SVDProjector,
               basis_group=Option(256, int, check=lambda v: v >= 2 and v % 2 == 0, rule="an even integer >= 2",
                                  doc="values of the basis sharing one int4 scale and zero point (Q-GaLore: 256)"))
PROJECTORS.add("dct", DCTProjector, dct_norm=SCORE_NORM, dct_method=DCT_METHOD)
PROJECTORS.add("columns", ColumnsProjector, dct_norm=SCORE_NORM)
PROJECTORS.add("random", RandomProjector)
PROJECTORS.add("identity", Identity)

REFRESH = Registry("refresh")
REFRESH.add("every", Every, update_proj_gap=GAP)
REFRESH.add("lazy", Lazy, update_proj_gap=GAP,
            lazy_threshold=Option(0.4, float, check=lambda v: 0 <= v <= 1, rule="in [0, 1]",
                                  doc="mean subspace overlap at which the gap grows"),
            lazy_window=positive_int("refreshes averaged for the overlap", 5),
            lazy_growth=Option(2.0, float, check=lambda v: v > 1, rule="above 1", doc="factor on the gap"))

__all__ = ["DCT_BASES", "PROJECTORS", "REFRESH", "Context", "Identity", "Projector", "dct_basis", "is_transposed",
           "orient"]
