"""Batch encoding of an item catalogue with a `MIMContentEncoder` (used by the Representation Center)."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import warnings
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from mim_hf.modeling.modeling_mim_encoder import has_injected_adapters
from mim_hf.modeling.processing_mim_encoder import rows_to_records

ENCODER_LEVELS = ("item_embeds", "text_embeds", "image_embeds")
# Text-tower linears (fnmatch patterns on module names; ``*`` crosses dots) that quantize_int8 keeps in
# float32 by default: all but the FFN input projections (``encoder.layer.N.intermediate.dense``).
# MovieLens / MiniLM, 800 items (bench_encoder.py's drift measures): all linears int8 -> cosine to fp32
# mean 0.976 / min 0.953, 10-NN overlap 0.71; FFN inputs only -> 0.992 / 0.976, 0.81 (budget: mean >= 0.99).
INT8_KEEP_FLOAT: tuple[str, ...] = ("encoder.layer.*.attention.*", "encoder.layer.*.output.dense", "pooler.*")
# Opt-in approximate inference schemes -> what they do (recorded by callers that store embeddings:
# embeddings from a quantised tower differ from fp32 ones, so they must not share a fingerprint).
QUANTIZATION_SCHEMES = {
    "int8": "dynamic int8 (fbgemm) for the text tower's FFN input projections only (INT8_KEEP_FLOAT stay fp32): "
            "weights int8 per output channel, activations quantised per batch at run time; CPU only",
    "int8-all": "dynamic int8 (fbgemm) for every text-tower nn.Linear (more drift); CPU only",
}


def _select_rows(items, indices: list[int]) -> list[dict]:
    """Rows ``indices`` of a datasets.Dataset / dict of lists / sequence of dicts, as dicts."""
    if hasattr(items, "select") and hasattr(items, "column_names"):  # datasets.Dataset: decodes only these rows
        return rows_to_records(items[indices])
    return [items[i] for i in indices]


def _text_columns(items, processor):
    """Rows without the image column (cheap to materialise for building texts)."""
    if hasattr(items, "select_columns") and hasattr(items, "column_names"):
        keep = [c for c in items.column_names if c != processor.image_field]
        return rows_to_records(items.select_columns(keep)[:])
    return items


def _pad_batch(tokenized: Mapping[str, list], indices: list[int], pad_token_id: int, padding_side: str) -> dict:
    """Token lists of rows ``indices`` -> LongTensors (B, longest row) padded like the tokenizer would."""
    rows = [tokenized["input_ids"][i] for i in indices]
    width = max(len(ids) for ids in rows)
    batch = {}
    for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key not in tokenized:
            continue
        tensor = torch.full((len(indices), width), fill, dtype=torch.long)
        for row, i in enumerate(indices):
            values = tokenized[key][i]
            if padding_side == "left":
                tensor[row, width - len(values):] = torch.tensor(values, dtype=torch.long)
            else:
                tensor[row, : len(values)] = torch.tensor(values, dtype=torch.long)
        batch[key] = tensor
    return batch


def quantize_int8(encoder, keep_float: Sequence[str] | None = None):
    """A copy of ``encoder`` whose text tower's ``nn.Linear`` layers (all but those matching
    ``keep_float``, default ``INT8_KEEP_FLOAT``; ``()`` quantises all) are dynamic int8 (approximate).

    Weights become int8 with one scale per output channel; activations are quantised per batch
    at run time (fbgemm kernels, CPU only). Embeddings drift from fp32 ones (see the benchmark
    for MovieLens: cosine to fp32 and neighbour agreement), so this is opt-in, never the default.
    Uses ``torch.ao.nn.quantized.dynamic.Linear``: PyTorch 2.13 marks quantized-tensor dtypes as
    deprecated (it warns once), and torchao's replacement is not a dependency here.

    Args:
        encoder: a ``MIMContentEncoder`` without injected LoRA layers (merge them first).
        keep_float: fnmatch patterns on the tower's module names (e.g. ``"encoder.layer.*.output.dense"``)
            of linears left in float32; None: ``INT8_KEEP_FLOAT``.
    Returns:
        a new encoder (the input is untouched) in eval mode.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    if has_injected_adapters(encoder):
        raise ValueError("quantize='int8' needs plain towers; merge LoRA first (mim_hf.encoder.lora.merge_adapters)")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantize='int8' needs the fbgemm engine; this torch has "
                         f"{torch.backends.quantized.supported_engines}")
    quantized = copy.deepcopy(encoder).eval().to("cpu")
    tower = quantized.text_model
    keep_float = tuple(keep_float) if keep_float is not None else INT8_KEEP_FLOAT
    targets = [(name, module) for name, module in tower.named_modules() if type(module) is torch.nn.Linear
               and not any(fnmatch.fnmatchcase(name, pattern) for pattern in keep_float)]
    with warnings.catch_warnings():
        # The quantized-dtype deprecation notice (PyTorch 2.13) is documented above, not repeated per layer.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        for name, module in targets:
            module.qconfig = per_channel_dynamic_qconfig
            parent_name, _, child = name.rpartition(".")
            parent = tower.get_submodule(parent_name) if parent_name else tower
            setattr(parent, child, DynamicInt8Linear.from_float(module))
    return quantized


FAST_PATHS = ("auto", "packed")


def _is_dynamic_int8_linear(module) -> bool:
    """True for ``torch.ao.nn.quantized.dynamic.Linear`` (what :func:`quantize_int8` puts in)."""
    return type(module).__name__ == "Linear" and type(module).__module__.startswith("torch.ao.nn.quantized.dynamic")


@functools.lru_cache(maxsize=None)
def _onednn_linear_ok() -> bool:
    """True if this torch build has oneDNN's fused linear (``mkldnn::_linear_pointwise``) and it agrees
    with ``F.linear`` (+ exact GELU) on a probe; checked once per process, else ``F.linear`` is used."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((9, 24), (40, 24), (40,)))
        with torch.inference_mode():
            plain = torch.nn.functional.linear(x, weight, bias)
            return (torch.allclose(op(x, weight, bias, "none", [], ""), plain, atol=1e-5, rtol=1e-5)
                    and torch.allclose(op(x, weight, bias, "gelu", [], "none"),
                                       torch.nn.functional.gelu(plain), atol=1e-5, rtol=1e-5))
    except (RuntimeError, TypeError):  # an op signature or build this code does not know
        return False


def packed_path_blocker(encoder, processor=None, levels: Sequence[str] = ("item_embeds",)) -> str | None:
    """Why the packed fast path cannot run ``encoder`` (a sentence), or None if it can.

    It covers text-only encoding through a plain transformers ``BertModel`` text tower (BERT, MiniLM,
    ...): absolute positions, exact-GELU/ReLU FFN, encoder-only, no injected LoRA, float32, and
    ``text_pooling`` mean / cls / pooler; a right-padding tokenizer (BERT positions count from the
    first padded slot, so left-padded batches are not the same computation).
    """
    tower = getattr(encoder, "text_model", None)
    if tower is None or type(tower).__name__ != "BertModel" or not type(tower).__module__.startswith("transformers."):
        return f"text tower is {type(tower).__name__}, not a transformers BertModel"
    config = tower.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "text tower is configured as a decoder"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={config.position_embedding_type!r} (only 'absolute')"
    if config.hidden_act not in ("gelu", "relu"):
        return f"hidden_act={config.hidden_act!r} (only 'gelu' and 'relu')"
    if has_injected_adapters(encoder):
        return "LoRA layers are injected (merge them first)"
    linears = [module for layer in tower.encoder.layer for module in (
        layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
        layer.attention.output.dense, layer.intermediate.dense, layer.output.dense)]
    if any(type(module) is not torch.nn.Linear and not _is_dynamic_int8_linear(module) for module in linears):
        return "the tower's linears are neither plain nn.Linear nor dynamic int8 (wrapped?)"
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in tower.parameters()) or (
            encoder.text_projection.weight.dtype != torch.float32):
        return "weights are not float32"
    if encoder.config.text_pooling not in ("mean", "cls", "pooler") or (
            encoder.config.text_pooling == "pooler" and getattr(tower, "pooler", None) is None):
        return f"text_pooling={encoder.config.text_pooling!r} with this tower"
    if "image_embeds" in levels:
        return "image_embeds requested"
    if processor is not None:
        if processor.image_processor is not None:
            return "the processor has an image processor (multimodal rows)"
        if getattr(processor.tokenizer, "padding_side", "right") != "right":
            return "the tokenizer pads on the left"
    return None


class PackedBertTextPath:
    """Inference-only text forward of a ``MIMContentEncoder`` with a ``BertModel`` tower, without padding.

    The same computation as ``encoder(input_ids, attention_mask).text_embeds`` (equal to float
    tolerance, ~1e-6), arranged for CPU speed:

    - token-wise layers (embeddings, Q/K/V, attention output, FFN, LayerNorm) run on the packed
      (tokens, hidden) matrix of the batch: no padded positions are computed at all;
    - Q, K and V are one GEMM per layer (their weights concatenated once, at construction);
    - attention runs per run of equal-length rows (rows are length-sorted inside each batch), as
      ``scaled_dot_product_attention`` on views of the fused QKV output: no mask, no padding;
    - on CPU, linears go through oneDNN's fused linear (bias, and GELU for the FFN, in the GEMM's
      epilogue) when this torch build has it and it agrees with ``F.linear`` (checked once);
      elsewhere ``F.linear``.

    The encoder's weights are read, not copied (except the concatenated QKV); build a new object
    after changing them. Check ``packed_path_blocker(encoder)`` first (ValueError here otherwise).
    """

    def __init__(self, encoder, device: torch.device | str | None = None):
        reason = packed_path_blocker(encoder)
        if reason is not None:
            raise ValueError(f"the packed fast path cannot run this encoder: {reason}")
        tower = encoder.text_model
        self.device = torch.device(device) if device is not None else encoder.device
        self.pooling = encoder.config.text_pooling
        self.embeddings = tower.embeddings
        self.pooler = tower.pooler
        self.projection = encoder.text_projection
        self.heads = tower.config.num_attention_heads
        self.gelu = tower.config.hidden_act == "gelu"
        self.onednn = self.device.type == "cpu" and _onednn_linear_ok()
        self.layers = []
        with torch.no_grad():
            for layer in tower.encoder.layer:
                attention = layer.attention.self
                qkv = (attention.query, attention.key, attention.value)
                if all(type(module) is torch.nn.Linear for module in qkv):  # one (3H, H) GEMM instead of three
                    qkv = torch.nn.utils.skip_init(torch.nn.Linear, attention.query.in_features,  # filled below
                                                   3 * attention.query.out_features, device=attention.query.weight.device)
                    qkv.weight.copy_(torch.cat([attention.query.weight, attention.key.weight, attention.value.weight]))
                    qkv.bias.copy_(torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]))
                self.layers.append({
                    "qkv": qkv, "scaling": attention.scaling,
                    "out": layer.attention.output.dense, "out_norm": layer.attention.output.LayerNorm,
                    "ffn_in": layer.intermediate.dense, "ffn_out": layer.output.dense,
                    "ffn_norm": layer.output.LayerNorm,
                })

    def _linear(self, x, module, activation: str = "none"):
        """``activation(module(x))`` for a plain or (int8 dynamic) quantised linear; a tuple of modules
        is applied side by side and concatenated (quantised Q/K/V)."""
        if isinstance(module, tuple):
            return torch.cat([self._linear(x, part) for part in module], dim=-1)
        if type(module) is not torch.nn.Linear:
            y = module(x)
        elif self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, module.weight, module.bias, activation, [],
                                                      "none" if activation == "gelu" else "")
        else:
            y = torch.nn.functional.linear(x, module.weight, module.bias)
        if activation == "gelu":
            return torch.nn.functional.gelu(y)
        return torch.relu(y) if activation == "relu" else y

    def __call__(self, input_ids: torch.Tensor, lengths: Sequence[int], token_type_ids: torch.Tensor | None = None):
        """Packed token ids (T,) of B rows laid end to end, ``lengths`` (B,) summing to T, rows sorted
        by length descending, optional packed token types (T,) -> L2-normalised text embeddings (B, embed_dim)."""
        if list(lengths) != sorted(lengths, reverse=True) or min(lengths) < 1:
            raise ValueError("lengths must be positive and sorted in descending order")
        if input_ids.shape != (sum(lengths),):
            raise ValueError(f"input_ids must have shape ({sum(lengths)},) (the lengths' sum), got {tuple(input_ids.shape)}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.embeddings.word_embeddings.num_embeddings:
            raise ValueError(f"input_ids hold ids in [{low}, {high}]; expected 0 <= id < vocab_size="
                             f"{self.embeddings.word_embeddings.num_embeddings} (is the tokenizer the text tower's?)")
        device = self.device
        lengths_t = torch.tensor(lengths, dtype=torch.long)
        starts = torch.cumsum(lengths_t, 0) - lengths_t
        total = int(lengths_t.sum())
        # Position of each token in its row, and which row it belongs to.
        row_of_token = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)
        positions = torch.arange(total) - starts[row_of_token]
        input_ids = input_ids.to(device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(total, dtype=torch.long)
        emb = self.embeddings
        x = (emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type_ids.to(device))
             + emb.position_embeddings(positions.to(device)))
        x = emb.LayerNorm(x)
        # Runs of equal-length rows: (first token, rows, length); attention needs no mask inside a run.
        runs, token = [], 0
        for length in sorted(set(lengths), reverse=True):
            count = lengths.count(length)
            runs.append((token, count, length))
            token += count * length
        hidden = x.shape[-1]
        head_dim = hidden // self.heads
        activation = "gelu" if self.gelu else "relu"
        for layer in self.layers:
            qkv = self._linear(x, layer["qkv"])
            context = torch.empty_like(x)
            for first, count, length in runs:
                block = qkv[first : first + count * length].view(count, length, 3, self.heads, head_dim)
                query, key, value = block.permute(2, 0, 3, 1, 4).unbind(0)
                attended = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=layer["scaling"])
                context[first : first + count * length].view(count, length, self.heads, head_dim).copy_(
                    attended.transpose(1, 2))
            attended = self._linear(context, layer["out"])
            x = layer["out_norm"](attended + x)
            inner = self._linear(x, layer["ffn_in"], activation)
            x = layer["ffn_norm"](self._linear(inner, layer["ffn_out"]) + x)
        starts = starts.to(device)
        if self.pooling == "mean":
            pooled = torch.zeros(len(lengths), hidden, dtype=x.dtype, device=device).index_add_(
                0, row_of_token.to(device), x) / lengths_t.to(device=device, dtype=x.dtype).unsqueeze(1)
        else:
            pooled = x[starts]
            if self.pooling == "pooler":
                pooled = torch.tanh(self.pooler.dense(pooled))
        return torch.nn.functional.normalize(self.projection(pooled), dim=-1)


@contextlib.contextmanager
def _attention_implementation(tower, implementation: str | None):
    """Run ``tower`` with ``implementation`` inside the block, restoring its own afterwards."""
    current = getattr(getattr(tower, "config", None), "_attn_implementation", None)
    if implementation is None or implementation == current or not hasattr(tower, "set_attn_implementation"):
        yield
        return
    tower.set_attn_implementation(implementation)
    try:
        yield
    finally:
        tower.set_attn_implementation(current)


def encode_items(
    encoder,
    processor,
    items,
    *,
    batch_size: int = 64,
    levels: Sequence[str] = ("item_embeds",),
    view: str = "full",
    sort_by_length: bool = True,
    show_progress: bool = True,
    device: torch.device | str | None = None,
    attn_implementation: str | None = "auto",
    quantize: str | None = None,
    fast_path: str | None = "auto",
) -> dict[str, torch.Tensor]:
    """Encode every item with ``encoder`` and return embeddings in the items' original order.

    Args:
        encoder: a ``MIMContentEncoder`` (put in eval mode here; LoRA merged or not).
        processor: its ``MIMContentProcessor``.
        items: ``datasets.Dataset``, dict of equal-length lists, or sequence of dicts with the
            processor's title / attribute / image columns. N rows.
        batch_size: rows per forward pass.
        levels: which outputs to return, from ``("item_embeds", "text_embeds", "image_embeds")``.
            ``"image_embeds"`` needs a vision tower.
        view: processor text view ("full", "title", "attributes").
        sort_by_length: batch rows of similar token length together (less padding); the output
            order is the input order either way.
        show_progress: tqdm progress bar over batches.
        device: where to run (default: the encoder's device).
        attn_implementation: text-tower attention for this call, restored afterwards. ``"auto"``:
            ``"eager"`` on CPU (short item texts: faster than SDPA's CPU kernel there, same result
            to ~1e-7), the tower's own elsewhere; ``None``: the tower's own; or any transformers name.
        quantize: ``None`` (exact fp32, the default), ``"int8"`` or ``"int8-all"``: run a dynamic-int8
            copy of the text tower (:func:`quantize_int8`; approximate, CPU only, see
            ``QUANTIZATION_SCHEMES``). On a 2-core AVX2 EPYC it was only ~4% faster than the exact fast
            path (1.29x against 1.24x sentence-transformers' ``encode``).
            It quantises a copy on every call (about a second for MiniLM); to encode more than once,
            call ``quantize_int8(encoder)`` once and pass the result with ``quantize=None``.
        fast_path: ``"auto"`` (default): text-only encodes through a plain ``BertModel`` tower (MiniLM,
            BERT) run :class:`PackedBertTextPath` (no padded positions computed, fused QKV, oneDNN
            fused linears on CPU; equal to the plain forward to float tolerance), anything else
            (see :func:`packed_path_blocker`) the plain forward; ``"packed"``: require it (ValueError
            saying why not); ``None``: always the plain forward.
    Returns:
        ``{level: FloatTensor (N, embed_dim)}`` on CPU, float32, L2-normalised rows; with
        ``"image_embeds"`` also ``"image_mask"``: BoolTensor (N,) (rows without image are zeros).
    All texts are built and tokenised once (one fast-tokenizer call); each batch is padded to its
    longest row; runs under ``torch.inference_mode``.
    """
    unknown = [level for level in levels if level not in ENCODER_LEVELS]
    if unknown or not levels:
        raise ValueError(f"levels {list(levels)!r} invalid; choose from {ENCODER_LEVELS}")
    if "image_embeds" in levels and getattr(encoder, "vision_model", None) is None:
        raise ValueError("level 'image_embeds' requested but the encoder has no vision tower")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if quantize is not None and quantize not in QUANTIZATION_SCHEMES:
        raise ValueError(f"quantize={quantize!r} is not supported; expected None or one of {list(QUANTIZATION_SCHEMES)}")
    if fast_path is not None and fast_path not in FAST_PATHS:
        raise ValueError(f"fast_path={fast_path!r} is not supported; expected None or one of {list(FAST_PATHS)}")
    if attn_implementation is not None and not isinstance(attn_implementation, str):
        raise TypeError(f"attn_implementation must be a str or None, got {type(attn_implementation).__name__}")
    if not isinstance(items, Mapping) and not hasattr(items, "__len__"):
        items = list(items)
    if isinstance(items, Mapping):
        items = rows_to_records(items)
    n_items = len(items)
    embed_dim = encoder.config.embed_dim
    results = {level: torch.zeros(n_items, embed_dim, dtype=torch.float32) for level in levels}
    if "image_embeds" in levels:
        results["image_mask"] = torch.zeros(n_items, dtype=torch.bool)
    if n_items == 0:
        return results

    device = torch.device(device) if device is not None else encoder.device
    if quantize is not None:
        if device.type != "cpu":
            raise ValueError(f"quantize={quantize!r} runs on CPU only, got device {device}")
        encoder = quantize_int8(encoder, keep_float=() if quantize == "int8-all" else None)
    encoder_device = getattr(encoder, "device", device)
    if torch.device(encoder_device).type != device.type:
        raise ValueError(f"device {device} but the encoder is on {encoder_device}; move it first (encoder.to(device))")
    if attn_implementation == "auto":
        attn_implementation = "eager" if device.type == "cpu" else None

    # One fast-tokenizer call for the whole catalogue (counts empty titles / truncations once).
    texts = processor.build_texts(_text_columns(items, processor), view=view)
    tokenized = processor.tokenize(texts, padding=False, return_tensors=None)
    order = list(range(n_items))
    if sort_by_length:
        order.sort(key=lambda i: len(tokenized["input_ids"][i]), reverse=True)
    pad_token_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    padding_side = getattr(processor.tokenizer, "padding_side", "right")
    with_images = processor.image_processor is not None
    packed = None
    if fast_path is not None:
        reason = packed_path_blocker(encoder, processor, levels)
        if reason is None:
            packed = PackedBertTextPath(encoder, device)
        elif fast_path == "packed":
            raise ValueError(f"fast_path='packed' cannot run here: {reason}")

    was_training = encoder.training
    encoder.eval()
    try:
        if packed is not None:
            with torch.inference_mode():
                _encode_packed(packed, tokenized, order, batch_size, results, show_progress)
            return results
        with torch.inference_mode(), _attention_implementation(encoder.text_model, attn_implementation):
            starts = range(0, n_items, batch_size)
            for start in tqdm(starts, disable=not show_progress, desc="encoding items", unit="batch"):
                batch_indices = order[start : start + batch_size]
                inputs = _pad_batch(tokenized, batch_indices, pad_token_id, padding_side)
                if with_images:
                    rows = _select_rows(items, batch_indices)
                    pixel_values, image_mask = processor.process_images([r.get(processor.image_field) for r in rows])
                    inputs["image_mask"] = image_mask
                    if pixel_values is not None:
                        inputs["pixel_values"] = pixel_values
                inputs = {key: value.to(device) for key, value in inputs.items()}
                output = encoder(**inputs, return_dict=True)
                index = torch.tensor(batch_indices, dtype=torch.long)
                for level in levels:
                    values = getattr(output, level)
                    if values is None:  # no image in this batch -> zero rows
                        continue
                    results[level][index] = values.float().cpu()
                if "image_mask" in results:
                    results["image_mask"][index] = output.image_mask.cpu()
    finally:
        encoder.train(was_training)
    return results


def _encode_packed(packed: "PackedBertTextPath", tokenized, order: list[int], batch_size: int, results: dict,
                   show_progress: bool) -> None:
    """Fill ``results`` (item/text embeds, (N, D)) batch by batch through ``packed`` in ``order``."""
    all_ids = tokenized["input_ids"]
    all_types = tokenized.get("token_type_ids")
    for start in tqdm(range(0, len(order), batch_size), disable=not show_progress, desc="encoding items",
                      unit="batch"):
        # Longest first inside the batch: equal-length rows then sit next to each other (one attention call each).
        batch_indices = sorted(order[start : start + batch_size], key=lambda i: len(all_ids[i]), reverse=True)
        lengths = [len(all_ids[i]) for i in batch_indices]
        input_ids = torch.tensor([token for i in batch_indices for token in all_ids[i]], dtype=torch.long)
        token_types = None
        if all_types is not None:
            token_types = torch.tensor([t for i in batch_indices for t in all_types[i]], dtype=torch.long)
        embeds = packed(input_ids, lengths, token_types).float().cpu()
        index = torch.tensor(batch_indices, dtype=torch.long)
        for level in results:
            results[level][index] = embeds  # text-only: item_embeds are the text embeddings


__all__ = ["encode_items", "PackedBertTextPath", "packed_path_blocker", "FAST_PATHS", "INT8_KEEP_FLOAT", "quantize_int8", "ENCODER_LEVELS", "QUANTIZATION_SCHEMES"]
