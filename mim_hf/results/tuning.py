"""The fixed tuning budget: one small grid, the same for every model, chosen on valid AUC only.

Every model (DIN-ID, FuxiCTR DIN, content-as-feature, both CiUBMs) gets the same grid per
protocol and fold: each setting is trained once with the first seed, at most ``epochs`` epochs
with early stopping on valid AUC (patience ``PATIENCE``); the setting with the best valid
overall AUC is then trained with the other seeds. Test metrics never take part in the choice.
"""

from __future__ import annotations

import itertools

PATIENCE = 2
# fields every grid may set: CTRTrainConfig names (FuxiCTR's adapter maps them onto its arguments)
TUNED_FIELDS = ("learning_rate", "id_embed_dim", "dropout", "weight_decay")
BUDGETS = {
    # 10 epochs and 1e-2: with a 5-epoch cap and {1e-3, 3e-3} about half of the runs peaked at their last
    # epoch and every `implicit` run chose 3e-3, by 0.015-0.03 valid AUC (docs/results-protocol.md)
    "small": {"epochs": 10, "grid": {"learning_rate": [1e-3, 3e-3, 1e-2]}},
    # one setting: for screening levers quickly (its rows are not tuned; the report says "screen")
    "screen": {"epochs": 5, "grid": {"learning_rate": [3e-3]}},
    "full": {"epochs": 10, "grid": {"learning_rate": [5e-4, 1e-3, 3e-3], "id_embed_dim": [16, 32],
                                    "dropout": [0.1, 0.3], "weight_decay": [0.0, 1e-5]}},
}
# Fields a split adds to every budget's grid (for the models that have them: not FuxiCTR's DIN).
# Under `temporal` few valid/test targets are unknown items, and the dropout that trains the
# unknown ID row takes IDs away from warm items, so valid decides between the shipped 0.1 and 0.
# Under `item-cold` every target is unknown: 0 would leave its ID row untrained, so it is no candidate.
SPLIT_GRID = {"temporal": {"unknown_id_dropout": [0.1, 0.0]}}
EXTRA_FIELDS = tuple(dict.fromkeys(field for grid in SPLIT_GRID.values() for field in grid))


def budget(name: str) -> dict:
    if name not in BUDGETS:
        raise ValueError(f"budget {name!r} is not one of {list(BUDGETS)}")
    return BUDGETS[name]


def settings_grid(budget_name: str, base: dict, extra: dict | None = None) -> list[dict]:
    """Every setting of the budget's grid plus ``extra`` (a split's fields, from :data:`SPLIT_GRID`),
    in a fixed order; the :data:`TUNED_FIELDS` the grid does not vary keep their ``base`` value
    (the shipped config's)."""
    missing = [f for f in TUNED_FIELDS if f not in base]
    if missing:
        raise ValueError(f"base settings lack {missing}; expected every one of {list(TUNED_FIELDS)}")
    grid = {**budget(budget_name)["grid"], **(extra or {})}
    names = list(grid)
    return [{**{f: base[f] for f in TUNED_FIELDS}, **dict(zip(names, values))}
            for values in itertools.product(*(grid[n] for n in names))]


def setting_id(setting: dict) -> str:
    """A short, file-name-safe name of a setting, e.g. ``lr0.001-emb16-do0.1-wd0`` (``-uid0`` added
    where the setting fixes ``unknown_id_dropout``)."""
    return (f"lr{setting['learning_rate']:g}-emb{setting['id_embed_dim']}-do{setting['dropout']:g}"
            f"-wd{setting['weight_decay']:g}"
            + (f"-uid{setting['unknown_id_dropout']:g}" if "unknown_id_dropout" in setting else ""))


def choose(valid_auc: dict[str, float | None]) -> str:
    """The setting id with the best valid AUC (ties: the first in grid order); ``valid_auc`` keeps
    grid order. Raises when no setting has a valid AUC."""
    scored = [(auc, -rank, sid) for rank, (sid, auc) in enumerate(valid_auc.items()) if auc is not None]
    if not scored:
        raise ValueError(f"no setting has a valid AUC to choose by: {valid_auc}")
    return max(scored)[2]
