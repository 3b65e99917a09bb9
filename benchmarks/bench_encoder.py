"""Content-encoder inference throughput: `mim_hf.encoder.encoding.encode_items` vs a reference.

Encodes MovieLens-100k item texts (or generated titles if the data cannot be loaded) with the
real all-MiniLM-L6-v2 text tower (offline copy), batch 64, 2 torch threads on CPU, and prints
items/s for encode_items (exact fp32 through its packed fast path, which is the default) and for
references measured in the same run, then per-round ratios, each line saying which path it is about.

The goal reference is sentence-transformers' ``SentenceTransformer.encode`` on the same folder
(384-d output, no projection: speed only), same titles, same batch size. Extra references (skipped
with ``--goal-only``): encode_items with ``fast_path=None`` (the plain padded forward, to read the
fast path's own gain), a faithful naive loop (catalogue order, padded to max_length, ``no_grad``),
both checked to give the same embeddings as the fast path; sentence-transformers with eager
attention; and the opt-in int8 path (default selective scheme) with its drift: cosine to the fp32
embeddings, overlap of the 10 nearest neighbours, title -> own-attributes recall@10.

Timing: one warm-up call per method, then ``--rounds`` rounds; each round runs every method once,
its order reversed every other round (ours and sentence-transformers stay back to back). A round's
ratio compares the two calls of that round, so machine-load drift hits both alike; the verdict is
the median of the per-round ratios (their range, the total-time ratio and best-vs-best are printed
beside it). ``--device cuda`` runs both on the GPU (``torch.cuda.synchronize()`` before every timer
read; no int8 there).

Run: .venv/bin/python benchmarks/bench_encoder.py [--rounds R] [--goal-only] [--device cpu|cuda] [--items N]
"""

import argparse
import importlib.util
import random
import statistics
import time

import torch

from mim_hf.encoder.build import build_content_encoder, build_content_processor, resolve_model_path
from mim_hf.encoder.encoding import encode_items, quantize_int8

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
INT8_NOTE = "quantize_int8 once, FFN inputs int8, approximate"


def movielens_items():
    """MovieLens-100k items as dicts (title, genres, year), or None with the reason."""
    try:
        from mim_hf.data import load_movielens_100k

        items = load_movielens_100k().items
        return [{"title": r["title"], "genres": r["genres"], "year": r["year"]} for r in items], "MovieLens-100k"
    except Exception as error:  # offline without the cached wheel -> generated titles
        return None, f"generated titles (MovieLens unavailable: {type(error).__name__}: {str(error)[:120]})"


def generated_items(n_items, seed=0):
    rng = random.Random(seed)
    words = ["Star", "Night", "Return", "Love", "City", "Dark", "Last", "Story", "Man", "War", "Game", "Dream",
             "Heat", "River", "Ghost", "King", "Blue", "Days", "Secret", "Road", "of", "the", "in", "and"]
    genres = ["Action", "Comedy", "Drama", "Thriller", "Romance", "Animation", "Sci-Fi", "Horror", "Documentary"]
    return [
        {"title": " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))).title() + f" ({rng.randint(1930, 1998)})",
         "genres": rng.sample(genres, rng.randint(1, 3)), "year": rng.randint(1930, 1998)}
        for _ in range(n_items)
    ]


def naive_reference(encoder, processor, items, batch_size, device):
    """Unsorted batches, padded to max_length, no_grad: what a first loop looks like."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            texts = processor.build_texts(items[start : start + batch_size])
            inputs = processor.tokenizer(texts, padding="max_length", truncation=True,
                                         max_length=processor.max_length, return_tensors="pt").to(device)
            outputs.append(encoder(**inputs).item_embeds)
    return torch.cat(outputs)


def neighbour_agreement(reference, other, k=10):
    """Mean overlap of each row's k nearest neighbours (cosine, self excluded) under two embeddings."""
    def top(embeds):
        similarity = embeds @ embeds.T
        similarity.fill_diagonal_(-float("inf"))
        return similarity.topk(k, dim=1).indices
    a, b = top(reference), top(other)
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (k * len(a))


def title_attribute_recall(titles, attributes, k=10):
    """Share of items whose own attribute text is among the k attribute texts nearest its title."""
    ranks = (titles @ attributes.T).topk(k, dim=1).indices
    return (ranks == torch.arange(len(titles)).unsqueeze(1)).any(dim=1).float().mean().item()


def summarise(ratios):
    """Per-round ratios -> (median, min, max)."""
    return statistics.median(ratios), min(ratios), max(ratios)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=None, help="limit the number of items")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timing rounds (every method once per round, after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both encode_items and sentence-transformers run (threads set on cpu only)")
    parser.add_argument("--goal-only", action="store_true",
                        help="time only encode_items fp32 and sentence-transformers' encode (skip the extra "
                             "references, the int8 path and its drift report)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if device.type == "cpu":
        torch.set_num_threads(2)
    torch.manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    items, source = movielens_items()
    if items is None:
        items = generated_items(args.items or 1682)
    items = items[: args.items] if args.items else items
    encoder = build_content_encoder(MODEL_ID, embed_dim=256, lora=False).eval().to(device)
    processor = build_content_processor(MODEL_ID, max_length=args.max_length)
    texts = processor.build_texts(items)

    def ours(model=encoder, **options):
        return lambda: encode_items(model, processor, items, batch_size=args.batch_size, show_progress=False,
                                    device=device, **options)["item_embeds"]

    OURS, PLAIN, INT8 = ("encode_items fp32 (exact; packed fast path)",
                         "encode_items fp32, fast_path=None (plain padded forward)",
                         f"encode_items int8 ({INT8_NOTE})")
    NAIVE = "naive loop (catalogue order, padded to max_length, no_grad)"
    ST_NAME, ST_EAGER = ("sentence-transformers encode (fp32, its default SDPA attention)",
                         "sentence-transformers encode (fp32, eager attention)")
    methods = {OURS: ours()}
    quantize_seconds = None
    if not args.goal_only:
        methods[PLAIN] = ours(fast_path=None)
        methods[NAIVE] = lambda: naive_reference(encoder, processor, items, args.batch_size, device)
        if device.type == "cpu":  # int8 (fbgemm) is CPU only; quantised once, as a caller encoding often would
            start = time.perf_counter()
            quantized = quantize_int8(encoder)
            quantize_seconds = time.perf_counter() - start
            methods[INT8] = ours(quantized)
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        def st_encode(model):
            model.max_seq_length = args.max_length
            return lambda: model.encode(texts, batch_size=args.batch_size, convert_to_tensor=True,
                                        show_progress_bar=False)

        path = resolve_model_path(MODEL_ID)
        methods[ST_NAME] = st_encode(SentenceTransformer(path, device=str(device)))
        if not args.goal_only:
            # Eager attention for ST too, so the attention choice can be read apart from the rest.
            methods[ST_EAGER] = st_encode(SentenceTransformer(
                path, device=str(device), model_kwargs={"attn_implementation": "eager"}))
    else:
        print("sentence-transformers not installed: no goal ratio (plain-forward and naive references only)")

    # Rounds: every method once, ours and ST back to back (their order alternating per round), so that
    # load drift on a shared machine hits a round's pair alike; the verdict uses per-round ratios.
    names = list(methods)
    seconds = {name: [] for name in names}
    embeds = {}
    for name in names:  # warm-up (allocator, oneDNN primitive caches, lazy imports)
        embeds[name] = methods[name]()
    sync()
    for round_index in range(args.rounds):
        round_names = names if round_index % 2 == 0 else names[::-1]
        for name in round_names:
            sync()
            start = time.perf_counter()
            embeds[name] = methods[name]()
            sync()
            seconds[name].append(time.perf_counter() - start)
    embeds = {name: value.float().cpu() for name, value in embeds.items()}

    n = len(items)
    mean_tokens = sum(len(ids) for ids in processor.tokenizer(texts)["input_ids"]) / n
    print(f"data: {source}; {n} items, mean {mean_tokens:.1f} tokens/text, max_length {args.max_length}")
    threads = f"torch threads {torch.get_num_threads()}" if device.type == "cpu" else f"device {torch.cuda.get_device_name()}"
    print(f"model: {MODEL_ID} (offline), batch {args.batch_size}, {threads}, {args.rounds} interleaved rounds "
          f"after a warm-up")
    print(f"{'method':<70}  {'median items/s':>14}  {'best':>8}  {'worst':>8}")
    for name in names:
        times = seconds[name]
        print(f"{name:<70}: {n / statistics.median(times):14.1f}  {n / min(times):8.1f}  {n / max(times):8.1f}")
    if PLAIN in embeds:
        for other in (PLAIN, NAIVE):
            max_diff = (embeds[other] - embeds[OURS]).abs().max().item()
            assert max_diff < 1e-4, f"encode_items (fast path) disagrees with {other}: max |diff| {max_diff}"
            print(f"encode_items fp32 (fast path) vs {other.split(' (')[0]}: embeddings agree (max |diff| {max_diff:.1e})")

    def ratio_line(label, reference, subject, goal=""):
        per_round = [r / s for r, s in zip(seconds[reference], seconds[subject])]
        median, low, high = summarise(per_round)
        aggregate = sum(seconds[reference]) / sum(seconds[subject])
        best = min(seconds[reference]) / min(seconds[subject])
        print(f"{label}: median {median:.2f}x per round (range {low:.2f}-{high:.2f} over {len(per_round)} rounds); "
              f"total time {aggregate:.2f}x; best vs best {best:.2f}x{goal}")

    if ST_NAME in seconds:
        ratio_line("GOAL LINE (exact fp32): encode_items / sentence-transformers encode", ST_NAME, OURS,
                   " (goal >= 1.3, read the per-round median)")
    if not args.goal_only:
        ratio_line("encode_items fast path / its plain padded forward", PLAIN, OURS)
        ratio_line("encode_items fast path / naive loop", NAIVE, OURS)
        if ST_EAGER in seconds:
            ratio_line("encode_items fast path / sentence-transformers with eager attention", ST_EAGER, OURS)
        if INT8 in seconds:
            print(f"int8: quantize_int8 took {quantize_seconds:.2f} s once (encode_items(quantize='int8') pays it per call)")
            cosine = torch.nn.functional.cosine_similarity(embeds[OURS], embeds[INT8], dim=1)
            print(f"int8 drift vs fp32 item embeddings: cosine min {cosine.min():.4f} mean {cosine.mean():.4f}; "
                  f"10-nearest-neighbour agreement {neighbour_agreement(embeds[OURS], embeds[INT8]):.3f}")
            recalls = {}
            for label, model in (("fp32", encoder), ("int8", quantized)):
                views = [encode_items(model, processor, items, batch_size=args.batch_size, show_progress=False,
                                      view=view)["item_embeds"] for view in ("title", "attributes")]
                recalls[label] = title_attribute_recall(*views)
            print(f"title->own attributes recall@10 (untrained projection): fp32 {recalls['fp32']:.3f}, "
                  f"int8 {recalls['int8']:.3f}")
            if ST_NAME in seconds:
                ratio_line("approximate path: encode_items int8 / sentence-transformers fp32 encode", ST_NAME, INT8,
                           " (embeddings drift, see above)")


if __name__ == "__main__":
    main()
