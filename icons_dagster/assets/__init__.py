"""Thin asset functions, one module per stage."""

from icons_dagster.assets._context import GROUP, SELECTION_POOL
from icons_dagster.assets.gradients import training_gradients, validation_gradients
from icons_dagster.assets.influence import task_influence
from icons_dagster.assets.pool import training_pool, warmup_subset
from icons_dagster.assets.selection import selected_subset, vote_table
from icons_dagster.assets.warmup import warmup_checkpoint

__all__ = ["GROUP", "ICONS_ASSETS", "SELECTION_POOL"]

ICONS_ASSETS = [
    training_pool,
    warmup_subset,
    warmup_checkpoint,
    training_gradients,
    validation_gradients,
    task_influence,
    vote_table,
    selected_subset,
]
