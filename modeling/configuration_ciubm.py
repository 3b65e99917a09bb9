"""CiUBM configuration (Stage 3 of MIM: content-interest-aware user behaviour modelling).

Imports only transformers (and the standard library) so the file can be uploaded as Hub
remote code next to ``modeling_ciubm.py``.
"""

from dataclasses import field

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

CIUBM_MODES = ("din", "content_feature", "ciubm")
CIUBM_BASES = ("din", "sim")
UNKNOWN_ROW_POLICIES = ("zero", "trained")
ATTENTION_NORMALIZATIONS = ("softmax", "sum")


class CiUBMConfig(PretrainedConfig):
    r"""Configuration of [`CiUBMForCTR`]; every field has a default.

    Model variant
        mode (`str`, "ciubm"): "din" = ID/side-feature DIN only (content inputs ignored);
            "content_feature" = DIN + projected target content and mean behaviour content as
            extra features; "ciubm" = full content-interest model (parts switched below).
        base (`str`, "din"): "din" attends over the whole behaviour sequence; "sim" first keeps
            the `sim_top_k` behaviours most content-similar to the target (needs content
            inputs in every mode).
        sim_top_k (`int`, 50): behaviours kept by the "sim" search stage.

    Vocabulary sizes (each counts row 0, the padding/unknown row)
        n_users (`int`, 1000): rows of the user-ID embedding table.
        n_items (`int`, 2000): rows of the item-ID embedding table.
        user_feature_sizes (`dict[str, int]`, {}): user side feature name -> vocabulary size.
        item_feature_sizes (`dict[str, int]`, {}): item side feature name -> vocabulary size.
        multi_valued_item_features (`list[str]`, []): item features holding several values
            per item (e.g. "item_genres"), embedded as the mean over non-padding values.
        vocabularies (`dict[str, list[str]] | None`, None): the token list of each
            vocabulary ("user_id", "item_id", side-feature names); token i is row i, token 0
            the padding/unknown token. When given, the sizes above are derived from it.

    Dimensions and layers
        id_embed_dim (`int`, 16): width of every ID and side-feature embedding.
        content_dim (`int`, 384): width of the Representation Center's content embeddings.
        content_proj_dim (`int`, 32): width content vectors are projected to before fusion.
        attention_hidden_sizes (`list[int]`, [64, 32]): hidden layers of the DIN attention MLP.
        attention_normalization (`str`, "softmax"): "softmax" = masked softmax over behaviours
            (bounded interest vector, similarity bias acts as a log-weight); "sum" = DIN
            paper's unnormalised weighted sum (keeps interest intensity).
        fusion_hidden_sizes (`list[int]`, [256, 128]): hidden layers of the fusion MLP.
        hidden_act (`str`, "relu"): activation of both MLPs (a transformers ACT2FN name).
        attention_activation (`str`, *optional*): the DIN attention MLP's activation alone: "dice"
            (DIN's data-adaptive activation, FuxiCTR's default there: sigmoid(batch-norm(h)) gates h
            against alpha * h, alpha learned per unit from 0; the statistics are over real
            behaviours, never padding) or an ACT2FN name; `None` = `hidden_act`.
        dropout (`float`, 0.1): dropout after every hidden layer of the fusion MLP.
        initializer_range (`float`, 0.02): std of the normal init of weights and embeddings.
        embedding_initializer_range (`float`, *optional*): std of the embeddings' normal init alone
            (FuxiCTR starts its embeddings at 1e-4); `None` = `initializer_range`.

    Content-interest parts (mode "ciubm")
        content_interest_vector (`bool`, True): (a) pool behaviour content with
            softmax(cos-sim(target, behaviour) / content_temperature).
        content_temperature (`float`, 0.1): temperature of that softmax.
        similarity_in_attention (`bool`, True): (b) content similarity in the ID-attention logits.
        similarity_attention (`str`, "bias"): how: "bias" adds scale * cos-sim; "aware" (similarity-
            aware target attention) gives b1 * score + b2 * cos/t + b3 * score * cos/t with learned
            b1, b2, b3 (t = content_temperature; starts equal to "bias").
        similarity_scale_init (`float`, 1.0): initial value of that learnable scale.
        similarity_histogram (`bool`, True): (c) a histogram of cos-sim over the behaviours as features.
        histogram_kind (`str`, "fraction"): "fraction" = fraction of behaviours per bin; "simtier" =
            each bin a learned vector (width content_proj_dim) weighted by log(1 + count).
        histogram_n_bins (`int`, 10): equal-width bins over [-1, 1] (20 = bins of 0.1).
        content_to_id (`bool`, False): modes "ciubm"/"content_feature": items whose ID row is unknown
            (cold items, IDs dropped in training) get an ID embedding generated from their content;
            trained through `unknown_id_dropout`, which must then be > 0.

    Unknown IDs
        unknown_row_policy (`str`, "zero"): row 0 of the user/item ID tables, where unknown and
            padding IDs map: "zero" = fixed zero vector, never updated (padding_idx); "trained" =
            starts at zero and is trained through `unknown_id_dropout`.
        unknown_id_dropout (`float`, 0.0): in training, probability of replacing a user/item ID
            by 0 so row 0 learns what an unseen ID looks like (must be > 0 for "trained").

    Debugging
        check_inputs (`bool`, False): `forward` checks index ranges, labels and finite logits
            (one host sync per batch); off by default, the collator checks the data.

    Representation Center provenance (recorded, not checked by the model)
        center_fingerprint (`str | None`, None): fingerprint of the content embedding table.
        center_repo (`str | None`, None): Hub repo or path of the Representation Center.
        center_revision (`str | None`, None): its revision.

    Why vocabularies live in the config: ``save_pretrained``/``from_pretrained``/
    ``push_to_hub`` and ``AutoConfig`` then carry them with no override and no extra file to
    keep in sync, and the embedding sizes are checked against them in one place. The cost,
    about 10 bytes per ID in config.json, is fine up to ~10^6 IDs; beyond that a separate
    vocabulary file would be the better trade.
    """

    model_type = "ciubm"

    mode: str = "ciubm"
    base: str = "din"
    sim_top_k: int = 50
    n_users: int = 1000
    n_items: int = 2000
    user_feature_sizes: dict = field(default_factory=dict)
    item_feature_sizes: dict = field(default_factory=dict)
    multi_valued_item_features: list = field(default_factory=list)
    vocabularies: dict | None = None
    id_embed_dim: int = 16
    content_dim: int = 384
    content_proj_dim: int = 32
    attention_hidden_sizes: list = field(default_factory=lambda: [64, 32])
    attention_normalization: str = "softmax"
    fusion_hidden_sizes: list = field(default_factory=lambda: [256, 128])
    hidden_act: str = "relu"
    attention_activation: str | None = None
    dropout: float = 0.1
    initializer_range: float = 0.02
    embedding_initializer_range: float | None = None
    content_interest_vector: bool = True
    content_temperature: float = 0.1
    similarity_in_attention: bool = True
    similarity_scale_init: float = 1.0
    similarity_attention: str = "bias"
    similarity_histogram: bool = True
    histogram_kind: str = "fraction"
    histogram_n_bins: int = 10
    content_to_id: bool = False
    unknown_row_policy: str = "zero"
    unknown_id_dropout: float = 0.0
    check_inputs: bool = False
    center_fingerprint: str | None = None
    center_repo: str | None = None
    center_revision: str | None = None

    def __post_init__(self, **kwargs):
        self._check_choice("mode", self.mode, CIUBM_MODES)
        self._check_choice("base", self.base, CIUBM_BASES)
        self._check_choice("unknown_row_policy", self.unknown_row_policy, UNKNOWN_ROW_POLICIES)
        self._check_choice("similarity_attention", self.similarity_attention, ("bias", "aware"))
        self._check_choice("histogram_kind", self.histogram_kind, ("fraction", "simtier"))
        self._check_choice(
            "attention_normalization", self.attention_normalization, ATTENTION_NORMALIZATIONS
        )
        if self.attention_activation not in (None, "dice") and self.attention_activation not in ACT2FN:
            raise ValueError(f"attention_activation must be None, 'dice' or a transformers ACT2FN name, got "
                             f"{self.attention_activation!r}")
        self.user_feature_sizes = dict(self.user_feature_sizes)
        self.item_feature_sizes = dict(self.item_feature_sizes)
        self.multi_valued_item_features = list(self.multi_valued_item_features)
        self.attention_hidden_sizes = list(self.attention_hidden_sizes)
        self.fusion_hidden_sizes = list(self.fusion_hidden_sizes)
        if self.vocabularies is not None:
            self._sizes_from_vocabularies()
        for name in list(self.user_feature_sizes) + list(self.item_feature_sizes):
            if not name.isidentifier():
                raise ValueError(f"feature name {name!r} must be a Python identifier (no dots or spaces)")
        for name in self.multi_valued_item_features:
            if name not in self.item_feature_sizes:
                raise ValueError(
                    f"multi_valued_item_features names {name!r}, absent from item_feature_sizes "
                    f"{sorted(self.item_feature_sizes)}"
                )
        sizes = {"n_users": self.n_users, "n_items": self.n_items}
        sizes.update(self.user_feature_sizes)
        sizes.update(self.item_feature_sizes)
        for name, size in sizes.items():
            if int(size) < 2:
                raise ValueError(f"vocabulary size of {name!r} is {size}; needs >= 2 (row 0 + one token)")
        positive = {
            "sim_top_k": self.sim_top_k, "id_embed_dim": self.id_embed_dim,
            "content_dim": self.content_dim, "content_proj_dim": self.content_proj_dim,
            "histogram_n_bins": self.histogram_n_bins,
        }
        for name, value in positive.items():
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.content_temperature > 0:
            raise ValueError(f"content_temperature must be > 0, got {self.content_temperature}")
        if self.embedding_initializer_range is not None and not self.embedding_initializer_range > 0:
            raise ValueError(f"embedding_initializer_range must be > 0 or None, got {self.embedding_initializer_range}")
        if not 0.0 <= self.unknown_id_dropout < 1.0:
            raise ValueError(f"unknown_id_dropout must be in [0, 1), got {self.unknown_id_dropout}")
        if self.unknown_row_policy == "trained" and self.unknown_id_dropout == 0.0:
            raise ValueError(
                "unknown_row_policy='trained' needs unknown_id_dropout > 0; otherwise row 0 is never "
                "trained and unknown IDs would hit an untouched row (use 'zero' instead)"
            )
        if self.content_to_id and (self.mode == "din" or self.unknown_id_dropout == 0.0):
            raise ValueError(
                f"content_to_id needs content (mode 'ciubm' or 'content_feature', got {self.mode!r}) and "
                f"unknown_id_dropout > 0 (got {self.unknown_id_dropout}): the generator learns where IDs are dropped")
        super().__post_init__(**kwargs)

    @staticmethod
    def _check_choice(name, value, choices):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    def _sizes_from_vocabularies(self):
        """Derive n_users / n_items / feature sizes from the stored token lists; mismatch -> error."""
        vocabularies = {name: list(tokens) for name, tokens in self.vocabularies.items()}
        for required in ("user_id", "item_id"):
            if required not in vocabularies:
                raise ValueError(
                    f"vocabularies must contain {required!r}; got keys {sorted(vocabularies)}"
                )
        self.vocabularies = vocabularies
        self.n_users = len(vocabularies["user_id"])
        self.n_items = len(vocabularies["item_id"])
        for sizes in (self.user_feature_sizes, self.item_feature_sizes):
            for name in sizes:
                if name not in vocabularies:
                    raise ValueError(f"feature {name!r} has no vocabulary in {sorted(vocabularies)}")
                if sizes[name] != len(vocabularies[name]):
                    raise ValueError(
                        f"feature {name!r}: size {sizes[name]} disagrees with its vocabulary "
                        f"({len(vocabularies[name])} tokens)"
                    )


__all__ = ["CiUBMConfig"]

# save_pretrained then writes auto_map and copies this file (remote-code loading)
CiUBMConfig.register_for_auto_class("AutoConfig")
