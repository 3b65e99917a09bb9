"""C-SFT training-step time with a 4096-row negative queue vs without (goal: ratio <= 1.15).

Encoder: a small randomly initialised BERT (transformers ``BertModel``: hidden 256, 2 layers,
4 heads, intermediate 1024, 24 tokens per title), mean-pooled, with a text projection and a
fused-item projection to 256-d -- the shape of a real C-SFT text tower, smaller. Loss:
``MultiLevelInfoNCE`` over the item and text levels (a text-only catalogue), so the queued
run keeps two 4096-row queues. Step = encode 128 triggers + 128 targets, loss, backward,
AdamW step. The queues are pre-filled so every timed step pays for all 4096 rows.
Both configurations run in the same process, interleaved step by step so machine load hits
both alike; the figure is the ratio of median step times.

    python benchmarks/bench_csft.py [--steps 8] [--batch 128] [--queue 4096] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers import BertConfig, BertModel

from mim_hf.csft.losses import MultiLevelInfoNCE


class TinyTextTower(nn.Module):
    """Token ids ``(N, L)`` -> dict of ``item_embeds`` and ``text_embeds`` ``(N, embed_dim)``."""

    def __init__(self, embed_dim: int = 256) -> None:
        super().__init__()
        config = BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=1024, max_position_embeddings=64)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.text_projection = nn.Linear(256, embed_dim)
        self.item_fusion = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        text_embeds = self.text_projection(pooled)
        return {"item_embeds": self.item_fusion(text_embeds), "text_embeds": text_embeds, "image_embeds": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=128, help="trigger -> target pairs per step")
    parser.add_argument("--queue", type=int, default=4096, help="queue rows per level")
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    num_items = 20_000

    runs = {}
    for name, queue_size in (("no_queue", 0), ("queue", args.queue)):
        torch.manual_seed(0)  # same encoder weights for both configurations
        encoder = TinyTextTower().to(device)
        loss_fn = MultiLevelInfoNCE(weights={"item": 1.0, "text": 0.5}, queue_size=queue_size,
                                    embed_dim=256, catalogue_size=num_items).to(device)
        for direction in loss_fn.directions.values():
            if direction.queue is not None:  # pre-fill: every timed step pays for the full queue
                direction.queue.enqueue(torch.randn(queue_size, 256, device=device),
                                        torch.randint(0, num_items, (queue_size,), device=device))
        optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(loss_fn.parameters()), lr=1e-4)
        runs[name] = (encoder, loss_fn, optimizer)

    generator = torch.Generator().manual_seed(1)

    def make_batch():
        ids = torch.randint(1000, 30000, (2 * args.batch, args.seq_len), generator=generator)
        mask = torch.ones_like(ids)
        mask[:, args.seq_len // 2:] = torch.rand(2 * args.batch, 1, generator=generator) > 0.5  # ragged titles
        item_ids = torch.randint(0, num_items, (2 * args.batch,), generator=generator)
        return ids.to(device), mask.to(device), item_ids.to(device)

    def step(name, batch) -> float:
        encoder, loss_fn, optimizer = runs[name]
        ids, mask, item_ids = batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = encoder(ids, mask)
        trigger = {k: (v[: args.batch] if v is not None else None) for k, v in outputs.items()}
        target = {k: (v[args.batch:] if v is not None else None) for k, v in outputs.items()}
        loss, _ = loss_fn(trigger, target, item_ids[: args.batch], item_ids[args.batch:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: [] for name in runs}
    for index in range(args.steps + 2):  # 2 warm-up steps
        batch = make_batch()
        order = list(runs) if index % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for name in order:
            elapsed = step(name, batch)
            if index >= 2:
                times[name].append(elapsed)

    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["queue"] / medians["no_queue"]
    print(f"device={device} batch={args.batch} seq_len={args.seq_len} steps={args.steps} "
          f"threads={torch.get_num_threads()} encoder=BERT(h256,L2) levels=item+text")
    print(f"step without queue : {medians['no_queue'] * 1000:8.1f} ms (median)")
    print(f"step with {args.queue} queue: {medians['queue'] * 1000:8.1f} ms (median)")
    print(f"ratio queue / no queue: {ratio:.3f}  (goal <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")


if __name__ == "__main__":
    main()
