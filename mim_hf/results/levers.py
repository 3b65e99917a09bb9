"""Levers: named changes to a content model that the harness runs as extra table rows (ablations).

A model name is a base model of :data:`mim_hf.results.harness.MODELS`, optionally followed by
levers: ``ciubm_csft+content_to_id+simtier``. A CTR lever sets CiUBMConfig fields (through the
CTR config's ``model_overrides``); a C-SFT lever changes the C-SFT stage, so a model with C-SFT
levers reads its own center, trained under ``csft+<levers>/`` of the fold.
"""

from __future__ import annotations

# lever -> (stage, fields): "ctr" fields go to CiUBMConfig, "csft" fields to CSFTConfig, except
# "start", which picks the encoder C-SFT starts from ("pretrained", as shipped, or "raw": the
# frozen towers of the `ciubm_raw` row, identity projection); a "center" lever adds the frozen
# towers' embedding to the model's center as a second channel (mim_hf.center.combine); a
# "setting" lever fixes a field of the CTR training setting (the base row's, or each grid point's)
LEVERS = {
    "simtier": ("ctr", {"histogram_kind": "simtier", "histogram_n_bins": 20}),
    "aware_attention": ("ctr", {"similarity_attention": "aware"}),
    "content_to_id": ("ctr", {"content_to_id": True}),
    # C-SFT changes against the shipped C-SFT config (cached towers, anchor 0.3, co-occurrence pairs
    # on MovieLens); "id_model": "din" = the fold's DIN-ID, trained once per fold under <fold>/id_model/
    # from the shipped DIN config (the C-SFT config's id_model_path points at it)
    "behaviour_pairs": ("csft", {"pair_source": "behaviour"}),
    "cooccurrence_pairs": ("csft", {"pair_source": "cooccurrence"}),
    "id_aligned_pairs": ("csft", {"pair_source": "id_aligned", "id_model": "din"}),
    "user_negatives": ("csft", {"hard_negatives": 4, "hard_negative_source": "user_negatives"}),
    "no_anchor": ("csft", {"anchor_weight": 0.0}),
    "from_raw": ("csft", {"start": "raw"}),
    "raw_channel": ("center", {"add": "raw"}),
    # a "setting" lever fixes a CTR training field of the row's setting (shown in its settings table)
    "id_dropout_high": ("setting", {"unknown_id_dropout": 0.5}),
}
CONTENT_BASES = ("content_feature", "ciubm_raw", "ciubm_pretrained", "ciubm_csft")


def parse_model(name: str) -> tuple[str, tuple[str, ...]]:
    """``"ciubm_csft+simtier"`` -> ``("ciubm_csft", ("simtier",))``, checked."""
    base, *levers = name.split("+")
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise ValueError(f"model {name!r}: unknown lever(s) {unknown}; choose from {list(LEVERS)}")
    if len(set(levers)) != len(levers):
        raise ValueError(f"model {name!r} names a lever twice")
    fields = [(LEVERS[lever][0], field) for lever in levers for field in LEVERS[lever][1]]
    if len(set(fields)) != len(fields):
        raise ValueError(f"model {name!r}: its levers set the same field ({sorted({f for f in fields if fields.count(f) > 1})}); "
                         "name one of them")
    if levers and base not in CONTENT_BASES:
        raise ValueError(f"model {name!r}: levers apply to the content models {list(CONTENT_BASES)}, not {base!r}")
    channels = [lever for lever in levers if LEVERS[lever][0] == "center"]
    if channels and base == "ciubm_raw":
        raise ValueError(f"model {name!r}: {channels} add the frozen towers' channel, which 'ciubm_raw' already reads")
    csft = [lever for lever in levers if LEVERS[lever][0] == "csft"]
    if csft and base != "ciubm_csft":
        raise ValueError(f"model {name!r}: C-SFT lever(s) {csft} need the base 'ciubm_csft'")
    return base, tuple(levers)


def overrides(levers, stage: str) -> dict:
    """The fields the levers set for ``stage`` ("ctr": CiUBMConfig fields, "csft": CSFTConfig fields,
    "setting": CTR training fields of the setting)."""
    fields: dict = {}
    for lever in levers:
        lever_stage, lever_fields = LEVERS[lever]
        if lever_stage == stage:
            fields.update(lever_fields)
    return fields


def center_name(center: str, levers) -> str:
    """The fold's center a model reads: ``center`` ("pretrained" / "csft"), ``csft+<levers>``
    when C-SFT levers change how that center is trained, then ``+<center levers>`` when channels
    are added to it."""
    csft = sorted(lever for lever in levers if LEVERS[lever][0] == "csft") if center == "csft" else []
    channels = sorted(lever for lever in levers if LEVERS[lever][0] == "center")
    return "+".join([center, *csft, *channels])


def center_channels(name: str) -> tuple[str, list[str]]:
    """``"csft+no_anchor+raw_channel"`` -> ``("csft+no_anchor", ["raw"])``: the center a stage
    trains and the centers added to it as channels."""
    parts = name.split("+")
    added = [LEVERS[p][1]["add"] for p in parts[1:] if LEVERS[p][0] == "center"]
    return "+".join(p for p in parts if p not in LEVERS or LEVERS[p][0] != "center"), added
