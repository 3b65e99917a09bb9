"""Processor for the MIM content encoder: item rows -> model inputs.

Self-contained: imports only ``transformers`` (and the standard library) so it can travel
with the model as remote code. It is a plain class rather than a ``ProcessorMixin``: its
input is item *rows* (title + attributes + image), not (text, images), and it keeps counts of
the fallbacks it applied. Its saved ``processor_config.json`` names it in ``auto_map``, so
``AutoProcessor.from_pretrained(folder, trust_remote_code=True)`` returns it.
"""

import base64
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence

import torch
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature
from transformers.image_utils import load_image
from transformers.utils import cached_file

# transformers' processor file name: AutoProcessor reads its "auto_map". Folders saved with the earlier
# name (LEGACY_PROCESSOR_CONFIG_NAME) still load.
PROCESSOR_CONFIG_NAME = "processor_config.json"
LEGACY_PROCESSOR_CONFIG_NAME = "mim_processor_config.json"
# Hub download options a from_pretrained call may carry on to the tokenizer / image processor loaders.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
# The constructor settings saved in PROCESSOR_CONFIG_NAME (tokenizer / image processor have their own files).
PROCESSOR_SETTINGS = (
    "max_length", "attribute_fields", "title_field", "image_field", "id_field", "attribute_separator", "untitled_text",
)
TEXT_VIEWS = ("full", "title", "attributes")
FALLBACK_COUNT_KEYS = (
    "empty_title",  # title empty/whitespace -> attributes text, else `untitled_text`
    "empty_attributes",  # view="attributes" with no attribute values -> title text
    "truncated_text",  # text longer than max_length tokens -> truncated to max_length
    "missing_image",  # image None -> image_mask False
    "unreadable_image",  # image could not be decoded -> image_mask False
    "converted_image_mode",  # image mode not RGB (L, RGBA, P, ...) -> converted to RGB
)


def has_saved_processor(directory) -> bool:
    """True if local ``directory`` holds a saved ``MIMContentProcessor`` (its tokenizer and settings)."""
    directory = str(directory)
    return os.path.isfile(os.path.join(directory, "tokenizer_config.json")) and any(
        os.path.isfile(os.path.join(directory, name)) for name in (PROCESSOR_CONFIG_NAME, LEGACY_PROCESSOR_CONFIG_NAME))


def rows_to_records(rows) -> list[dict]:
    """Item rows as a list of dicts; accepts a dict of equal-length lists (a datasets batch),
    a single dict of scalars is NOT accepted (ambiguous); or any sequence of dicts."""
    if isinstance(rows, Mapping):
        for key, values in rows.items():
            # A str is iterable: {"title": "Toy Story"} would silently become 9 one-letter items.
            if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
                raise TypeError(
                    f"item column {key!r} is a {type(values).__name__}; a dict of items must map each column to a "
                    "list of values (for one item pass [row])"
                )
        columns = {key: list(values) for key, values in rows.items()}
        lengths = {key: len(values) for key, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"item columns have different lengths: {lengths}")
        n_rows = next(iter(lengths.values()), 0)
        return [{key: columns[key][i] for key in columns} for i in range(n_rows)]
    if isinstance(rows, (str, bytes)):
        raise TypeError(f"items must be a dict of lists or a sequence of dicts, got {type(rows).__name__}")
    if isinstance(rows, Sequence) or hasattr(rows, "__iter__"):
        records = list(rows)
        for position, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise TypeError(f"item row {position} is a {type(record).__name__}; expected a dict")
        return records
    raise TypeError(f"items must be a dict of lists or a sequence of dicts, got {type(rows).__name__}")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip()
    )


def _check_encodable(text: str, row: int) -> None:
    """Lone surrogates (from broken decoding) make the tokenizer fail with an obscure TypeError."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"item row {row}: text {text[max(err.start - 10, 0):err.end + 10]!r} holds {text[err.start:err.end]!r}, "
                "which is not valid Unicode (a lone surrogate); expected text that encodes as UTF-8"
            ) from None


def format_attribute_value(value) -> str:
    """One attribute value as text: lists joined by ', ', integral floats without '.0'."""
    if isinstance(value, (list, tuple)):
        return ", ".join(format_attribute_value(v) for v in value if not _is_missing(v))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


class MIMContentProcessor:
    """Turn item rows into `MIMContentEncoder` inputs.

    A row has a title, attribute fields (e.g. genres, year, category, shape) and optionally an
    image (PIL image, file path, ``{"bytes": ..., "path": ...}`` dict, or None).
    Text template (``view="full"``): ``"Toy Story | genres: Animation, Comedy | year: 1995"``;
    ``view="title"`` gives the title alone and ``view="attributes"`` the attribute part alone
    (title <-> attributes alignment for text-only catalogues).

    Fallbacks are applied, never silent: each is counted in ``self.fallback_counts``
    (cumulative; see ``FALLBACK_COUNT_KEYS``; ``reset_fallback_counts()`` clears them).

    Args:
        tokenizer: the text tower's tokenizer.
        image_processor: the vision tower's image processor, or None (text-only).
        max_length: maximum tokens per text (special tokens included); longer texts truncated.
        attribute_fields: attribute columns in template order; None = every column except the
            title, image and id columns, in row order.
        title_field / image_field / id_field: column names.
        attribute_separator: text between title and attributes and between attributes.
        untitled_text: text used when an item has neither a title nor attributes.
    """

    def __init__(
        self,
        tokenizer,
        image_processor=None,
        max_length: int = 64,
        attribute_fields: list[str] | None = None,
        title_field: str = "title",
        image_field: str = "image",
        id_field: str = "item_id",
        attribute_separator: str = " | ",
        untitled_text: str = "[untitled]",
    ):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        for name, value in (("title_field", title_field), ("image_field", image_field), ("id_field", id_field),
                            ("attribute_separator", attribute_separator), ("untitled_text", untitled_text)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {value!r} ({type(value).__name__})")
        if attribute_fields is not None and (
            isinstance(attribute_fields, str) or not all(isinstance(f, str) for f in attribute_fields)
        ):
            raise TypeError(f"attribute_fields must be a list of column names (str) or None, got {attribute_fields!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length
        self.attribute_fields = list(attribute_fields) if attribute_fields is not None else None
        self.title_field = title_field
        self.image_field = image_field
        self.id_field = id_field
        self.attribute_separator = attribute_separator
        self.untitled_text = untitled_text
        self.fallback_counts = dict.fromkeys(FALLBACK_COUNT_KEYS, 0)

    def reset_fallback_counts(self) -> None:
        self.fallback_counts = dict.fromkeys(FALLBACK_COUNT_KEYS, 0)

    # ---- text -------------------------------------------------------------------------
    def attribute_text(self, record: Mapping) -> str:
        """``"genres: Animation, Comedy | year: 1995"`` for one row ('' if no values)."""
        reserved = {self.title_field, self.image_field, self.id_field}
        fields = self.attribute_fields or [key for key in record if key not in reserved]
        parts = []
        for field in fields:
            value = record.get(field)
            text = "" if _is_missing(value) else format_attribute_value(value)
            if text:
                parts.append(f"{field}: {text}")
        return self.attribute_separator.join(parts)

    def build_texts(self, rows, view: str = "full") -> list[str]:
        """Item rows -> one text per row for ``view`` in ("full", "title", "attributes")."""
        if view not in TEXT_VIEWS:
            raise ValueError(f"view={view!r} is not supported; expected one of {TEXT_VIEWS}")
        texts = []
        for record in rows_to_records(rows):
            raw_title = record.get(self.title_field)
            title = "" if _is_missing(raw_title) else str(raw_title).strip()
            attributes = self.attribute_text(record)
            if not title:
                self.fallback_counts["empty_title"] += 1
            if view == "attributes":
                if not attributes:
                    self.fallback_counts["empty_attributes"] += 1
                texts.append(attributes or title or self.untitled_text)
            elif view == "title":
                texts.append(title or attributes or self.untitled_text)
            else:
                texts.append(
                    self.attribute_separator.join(p for p in (title, attributes) if p) or self.untitled_text
                )
            _check_encodable(texts[-1], len(texts) - 1)
        return texts

    def tokenize(self, texts: list[str], padding="longest", return_tensors="pt"):
        """Texts -> tokenizer output (input_ids, attention_mask, ...) truncated to max_length;
        counts texts that had to be truncated."""
        # Count overflow once, without special tokens, then add the specials' budget.
        lengths = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        budget = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False)
        self.fallback_counts["truncated_text"] += sum(len(ids) > budget for ids in lengths)
        return self.tokenizer(
            texts, padding=padding, truncation=True, max_length=self.max_length, return_tensors=return_tensors
        )

    # ---- images -----------------------------------------------------------------------
    def load_rgb_image(self, image):
        """One image value -> RGB PIL image, or None (missing/unreadable, counted).

        Accepts a PIL image, a local file path, a ``{"bytes", "path"}`` dict or None; another type
        is a ``TypeError``. A path that is not a local file (URLs included: nothing is
        downloaded) or that does not decode counts as ``unreadable_image``.
        """
        if image is None:
            self.fallback_counts["missing_image"] += 1
            return None
        if isinstance(image, Mapping):
            raw, path = image.get("bytes"), image.get("path")
            if raw is not None and not isinstance(raw, (bytes, bytearray, memoryview)):
                raise TypeError(f"image dict 'bytes' must be bytes, got {type(raw).__name__}")
            if raw is None and path is not None and not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"image dict 'path' must be a str or path, got {type(path).__name__}")
        elif not isinstance(image, (str, os.PathLike)) and not hasattr(image, "convert"):
            raise TypeError(
                f"image must be a PIL image, a path, a {{'bytes','path'}} dict or None, got {type(image).__name__}"
            )
        try:
            if isinstance(image, Mapping):  # datasets Image feature, undecoded
                if image.get("bytes") is not None:
                    image = load_image(base64.b64encode(bytes(image["bytes"])).decode("ascii"))
                elif image.get("path"):
                    image = self._load_path(image["path"])
                else:
                    self.fallback_counts["missing_image"] += 1
                    return None
            elif isinstance(image, (str, os.PathLike)):
                image = self._load_path(image)
            image.load()  # force decoding now so truncated files are caught here
            if image.width == 0 or image.height == 0:
                raise ValueError("empty image")
            if image.mode != "RGB":
                image = image.convert("RGB")  # counted once it worked (a failed one is unreadable)
                self.fallback_counts["converted_image_mode"] += 1
            return image
        except Exception:  # any decoder failure -> documented, counted fallback
            self.fallback_counts["unreadable_image"] += 1
            return None

    @staticmethod
    def _load_path(path):
        """A local image file. URLs are not fetched: the processor never touches the network
        (an item table is data, and a fetch could hang); they count as unreadable."""
        path = os.fspath(path)
        if isinstance(path, bytes) or not os.path.isfile(path):
            raise FileNotFoundError(f"no local image file at {path!r}")
        return load_image(path)

    def process_images(self, images: list) -> tuple[torch.FloatTensor | None, torch.BoolTensor]:
        """Image values -> (pixel_values (B, C, H, W) with zeros where missing, or None if no
        row has an image; image_mask (B,))."""
        loaded = [self.load_rgb_image(image) for image in images]
        image_mask = torch.tensor([image is not None for image in loaded], dtype=torch.bool)
        if not bool(image_mask.any()):
            return None, image_mask
        present = self.image_processor(
            images=[image for image in loaded if image is not None], return_tensors="pt"
        )["pixel_values"]
        pixel_values = present.new_zeros((len(loaded),) + tuple(present.shape[1:]))
        pixel_values[image_mask] = present
        return pixel_values, image_mask

    def __call__(self, rows, view: str = "full", padding="longest", return_tensors: str = "pt") -> BatchFeature:
        """Item rows -> BatchFeature with input_ids (B, L), attention_mask (B, L) (+ token_type_ids
        for BERT-like tokenizers), image_mask (B,) and, when an image processor is set and some
        row has an image, pixel_values (B, C, H, W) (zeros for rows without image)."""
        records = rows_to_records(rows)
        if not records:
            raise ValueError("no item rows to process")
        encoded = dict(self.tokenize(self.build_texts(records, view=view), padding, return_tensors))
        if self.image_processor is not None:
            pixel_values, image_mask = self.process_images([r.get(self.image_field) for r in records])
            if pixel_values is not None:
                encoded["pixel_values"] = pixel_values
        else:
            image_mask = torch.zeros(len(records), dtype=torch.bool)
        encoded["image_mask"] = image_mask
        return BatchFeature(encoded)

    # ---- persistence --------------------------------------------------------------------
    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """What ``AutoProcessor`` calls on a remote-code processor class; ``save_pretrained`` always
        writes the ``AutoProcessor`` entry of ``auto_map``."""
        if auto_class != "AutoProcessor":
            raise ValueError(f"MIMContentProcessor registers for AutoProcessor only, got {auto_class!r}")

    def to_dict(self) -> dict:
        return {"processor_class": type(self).__name__, **{name: getattr(self, name) for name in PROCESSOR_SETTINGS}}

    def save_pretrained(self, save_directory) -> None:
        """Write tokenizer files, the image processor config (if any), ``processor_config.json`` (settings +
        ``auto_map`` so ``AutoProcessor.from_pretrained(dir, trust_remote_code=True)`` returns this class)
        and this file (the remote code that entry names)."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(save_directory)
        config = {**self.to_dict(), "auto_map": {"AutoProcessor": f"{__name__.split('.')[-1]}.{type(self).__name__}"}}
        with open(os.path.join(save_directory, PROCESSOR_CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
        if os.path.abspath(os.path.dirname(__file__)) != os.path.abspath(save_directory):
            shutil.copy(__file__, os.path.join(save_directory, os.path.basename(__file__)))

    @classmethod
    def from_pretrained(cls, text_model_path, vision_model_path=None, trust_remote_code: bool = False,
                        **kwargs) -> "MIMContentProcessor":
        """Load from a folder or Hub repo written by ``save_pretrained`` (or build from tower folders/ids:
        tokenizer from ``text_model_path``, image processor from ``vision_model_path`` or, if
        None, from ``text_model_path`` when it holds a preprocessor_config.json).
        ``kwargs``: Hub options (``revision``, ``token``, ...) and settings that override saved ones.
        A tokenizer / image processor that needs remote code loads only with ``trust_remote_code=True``."""
        kwargs.pop("_from_auto", None)  # set by AutoProcessor
        hub = {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}
        lookup = {**hub, "_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
        settings = {}
        config_file = cached_file(text_model_path, PROCESSOR_CONFIG_NAME, **lookup) or cached_file(
            text_model_path, LEGACY_PROCESSOR_CONFIG_NAME, **lookup)
        if config_file is not None:
            with open(config_file, encoding="utf-8") as handle:
                try:
                    settings = json.load(handle)
                except ValueError as err:
                    raise ValueError(f"{config_file}: not valid JSON ({err})") from None
            if not isinstance(settings, dict):
                raise ValueError(f"{config_file} holds {type(settings).__name__}; expected a JSON object")
            settings.pop("processor_class", None)
            settings.pop("auto_map", None)
            unknown = sorted(set(settings) - set(PROCESSOR_SETTINGS))
            if unknown:
                raise ValueError(f"{config_file}: unknown setting(s) {unknown}; expected some of {list(PROCESSOR_SETTINGS)}")
        settings.update(kwargs)
        tokenizer = AutoTokenizer.from_pretrained(text_model_path, trust_remote_code=trust_remote_code, **hub)
        image_processor = None
        if vision_model_path is not None:
            image_processor = AutoImageProcessor.from_pretrained(vision_model_path, trust_remote_code=trust_remote_code)
        elif cached_file(text_model_path, "preprocessor_config.json", **lookup) is not None:
            image_processor = AutoImageProcessor.from_pretrained(text_model_path, trust_remote_code=trust_remote_code,
                                                                 **hub)
        return cls(tokenizer, image_processor=image_processor, **settings)


__all__ = ["MIMContentProcessor", "FALLBACK_COUNT_KEYS", "rows_to_records", "format_attribute_value", "has_saved_processor"]
