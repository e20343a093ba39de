"""The narrow-vs-general study (`study`) and its verdict rules (`verdicts`; the statistics are `em_interp.stats`).

>>> from em_interp.study import run_study
>>> results = run_study("runs/demo", fast=True)  # doctest: +SKIP
"""

from em_interp.study import verdicts
from em_interp.study.study import (
    SeedResult,
    Study,
    StudyConfig,
    StudyData,
    ablation_with_control,
    append_record,
    contrastive_items,
    group_shifts,
    group_stats,
    output_direction,
    run_study,
    same_rows,
    study_data,
)

__all__ = [
    "SeedResult", "Study", "StudyConfig", "StudyData", "ablation_with_control", "append_record", "contrastive_items",
    "group_shifts", "group_stats", "output_direction", "run_study", "same_rows", "study_data", "verdicts",
]
