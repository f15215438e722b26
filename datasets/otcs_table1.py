"""The published Table 1 of OTCS (Gu et al., NeurIPS 2023), shipped beside it as ``otcs_table1.csv``.

One row per method, one ``<column>_<metric>`` header per cell (columns ``celeba``, ``animal``, ``digits``); each
task that reproduces a column declares ``paper_values = bench.paper.csv_column(TABLE, <its column>, names=NAMES)``.
"""
from __future__ import annotations

from pathlib import Path

TABLE = Path(__file__).resolve().parent / "otcs_table1.csv"
SOURCE = "OTCS Table 1 (Gu et al., NeurIPS 2023)"
# the paper's method names -> this harness's registry names
NAMES = {"W2GAN": "w2gan", "OT-ICNN": "ot-icnn", "OTM": "otm", "NOT": "not", "KNOT": "knot",
         "ReFlow": "reflow", "EGSDE": "egsde", "DDIB": "ddib", "TCR": "tcr", "SCONES": "scones",
         "OTCS": "otcs"}

