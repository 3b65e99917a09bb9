"""C-SFT contrastive losses: formula, masking, queue, state, multi-level, gradients."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from contrastive_reference import reference_infonce
from mim_hf.csft.losses import EmbeddingQueue, InfoNCELoss, MultiLevelInfoNCE, gather_with_grad

TAU = 0.1


def _leaf(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).float().requires_grad_(True)


def _ids(*values):
    return torch.tensor(values, dtype=torch.int64)


def test_formula_hand_computed():
    # Orthonormal anchors == positives: cos = 1 on the diagonal, 0 off it.
    anchors = torch.eye(2)
    loss = InfoNCELoss(temperature=0.5)(anchors, anchors.clone(), _ids(0, 1), _ids(2, 3))
    expected = math.log(1 + math.exp(-1 / 0.5))  # -log(e^{2} / (e^{2} + e^{0}))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_matches_reference_with_duplicates_hard_negatives_and_queue():
    anchors, positives = _leaf(5, 4, seed=0), _leaf(5, 4, seed=1)
    hard = _leaf(5, 2, 4, seed=2)
    anchor_ids = _ids(0, 1, 2, 3, 4)
    positive_ids = _ids(10, 11, 10, 2, 12)  # rows 0 and 2 share a target; row 3's target is row 2's trigger
    hard_ids = _ids(20, 10, 21, 1, 11, 22, 12, 23, 3, 24).reshape(5, 2)  # some equal the positive / anchor
    loss_fn = InfoNCELoss(temperature=TAU, queue_size=6)
    queue_embeds = _leaf(4, 4, seed=3).detach()
    queue_ids = _ids(11, 30, 12, 2)
    loss_fn.init_queue(4).enqueue(queue_embeds, queue_ids)

    loss = loss_fn(anchors, positives, anchor_ids, positive_ids, hard_negatives=hard, hard_negative_ids=hard_ids)
    loss.backward()
    grads = (anchors.grad.clone(), positives.grad.clone(), hard.grad.clone())
    for t in (anchors, positives, hard):
        t.grad = None
    expected = reference_infonce(anchors, positives, anchor_ids, positive_ids, TAU,
                                 hard=hard, hard_ids=hard_ids, queue=queue_embeds, queue_ids=queue_ids)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(grads, (anchors.grad, positives.grad, hard.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_logq_correction_matches_reference_and_shift_invariance():
    anchors, positives = _leaf(5, 4, seed=4), _leaf(5, 4, seed=5)
    anchor_ids, positive_ids = _ids(0, 1, 2, 3, 4), _ids(5, 6, 5, 7, 8)
    log_prior = torch.log(torch.tensor([1, 1, 1, 1, 1, 40, 3, 1, 10], dtype=torch.float32) / 59)
    loss_fn = InfoNCELoss(temperature=TAU, queue_size=4, candidate_log_prior=log_prior)
    queue_embeds, queue_ids = _leaf(3, 4, seed=6).detach(), _ids(8, 6, 1)
    loss_fn.init_queue(4).enqueue(queue_embeds, queue_ids)
    loss = loss_fn(anchors, positives, anchor_ids, positive_ids)
    expected = reference_infonce(anchors, positives, anchor_ids, positive_ids, TAU, queue=queue_embeds,
                                 queue_ids=queue_ids, log_prior=log_prior)
    plain = reference_infonce(anchors, positives, anchor_ids, positive_ids, TAU, queue=queue_embeds,
                              queue_ids=queue_ids)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - plain.item()) > 1e-3  # the correction changes a skewed batch
    # A uniform prior is a constant shift of every logit: the softmax, hence the loss, is unchanged.
    uniform = InfoNCELoss(temperature=TAU, candidate_log_prior=torch.full((9,), math.log(1 / 9)))
    assert uniform(anchors, positives, anchor_ids, positive_ids).item() == pytest.approx(
        InfoNCELoss(temperature=TAU)(anchors, positives, anchor_ids, positive_ids).item(), rel=1e-5)


@pytest.mark.parametrize("prior, match", [(torch.tensor([0.0, float("-inf")]), "finite"),
                                          (torch.zeros(2, 2), "1-d")])
def test_logq_prior_bad_input(prior, match):
    with pytest.raises(ValueError, match=match):
        InfoNCELoss(candidate_log_prior=prior)


def test_logq_prior_too_short_for_ids():
    loss_fn = InfoNCELoss(candidate_log_prior=torch.zeros(3))
    with pytest.raises(ValueError, match="no entry in candidate_log_prior"):
        loss_fn(_leaf(2, 4, seed=0), _leaf(2, 4, seed=1), _ids(0, 1), _ids(2, 7))


def test_masking_positions_batch_hard_and_queue():
    loss_fn = InfoNCELoss(temperature=TAU, queue_size=3)
    loss_fn.init_queue(4).enqueue(torch.randn(3, 4), _ids(7, 5, 8))
    view = loss_fn.similarity_logits(
        torch.randn(3, 4), torch.randn(3, 4), _ids(1, 5, 3), _ids(7, 7, 1),
        hard_negatives=torch.randn(3, 1, 4), hard_negative_ids=_ids(7, 9, 3).reshape(3, 1),
    )
    # columns: [p0 (7), p1 (7), p2 (1) | hard | queue 7, 5, 8]
    expected_masked = torch.tensor([
        [False, True, True, True, True, False, False],    # anchor 1 -> 7: other 7s, own id 1 (p2)
        [True, False, False, False, True, True, False],   # anchor 5 -> 7: other 7s, own id 5 (queue)
        [False, False, False, True, False, False, False],  # anchor 3 -> 1: hard negative 3 is itself
    ])
    assert torch.equal(torch.isinf(view.logits), expected_masked)
    assert view.positive_index.tolist() == [0, 1, 2]


def test_all_targets_same_item_gives_zero_not_nan():
    anchors, positives = _leaf(4, 3, seed=4), _leaf(4, 3, seed=5)
    loss_fn = InfoNCELoss(temperature=TAU, queue_size=8)
    for _ in range(2):  # second step: the queue is full of copies of the same target
        loss = loss_fn(anchors, positives, _ids(0, 1, 2, 3), _ids(9, 9, 9, 9))
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(anchors.grad).all() and torch.count_nonzero(anchors.grad) == 0


def test_symmetric_is_mean_of_both_directions():
    anchors, positives = _leaf(4, 3, seed=6), _leaf(4, 3, seed=7)
    anchor_ids, positive_ids = _ids(0, 1, 2, 3), _ids(4, 5, 4, 0)
    loss = InfoNCELoss(temperature=TAU, symmetric=True)(anchors, positives, anchor_ids, positive_ids)
    forward = reference_infonce(anchors, positives, anchor_ids, positive_ids, TAU)
    reverse = reference_infonce(positives, anchors, positive_ids, anchor_ids, TAU)
    assert loss.item() == pytest.approx(0.5 * (forward + reverse).item(), rel=1e-5)


def test_pair_mask_excludes_rows_as_anchors_and_candidates():
    anchors, positives = _leaf(5, 3, seed=8), _leaf(5, 3, seed=9)
    anchor_ids, positive_ids = _ids(0, 1, 2, 3, 4), _ids(5, 6, 7, 8, 9)
    keep = torch.tensor([True, False, True, True, False])
    loss = InfoNCELoss(temperature=TAU)(anchors, positives, anchor_ids, positive_ids, pair_mask=keep)
    subset = InfoNCELoss(temperature=TAU)(anchors[keep], positives[keep], anchor_ids[keep], positive_ids[keep])
    assert loss.item() == pytest.approx(subset.item(), rel=1e-6)
    none_kept = InfoNCELoss(temperature=TAU)(anchors, positives, anchor_ids, positive_ids,
                                             pair_mask=torch.zeros(5, dtype=torch.bool))
    assert none_kept.item() == 0.0


def test_world_size_one_gather_is_plain_in_batch_loss():
    tensor = torch.randn(3, 2)
    assert gather_with_grad(tensor) is tensor
    anchors, positives = _leaf(4, 3, seed=10), _leaf(4, 3, seed=11)
    ids = (_ids(0, 1, 2, 3), _ids(4, 5, 6, 4))
    gathered = InfoNCELoss(temperature=TAU, gather_across_devices=True)(anchors, positives, *ids)
    plain = InfoNCELoss(temperature=TAU)(anchors, positives, *ids)
    assert gathered.item() == plain.item()


def test_queue_fifo_order_and_wraparound():
    queue = EmbeddingQueue(size=5, dim=2)
    assert len(queue) == 0 and queue.candidates()[0].shape == (0, 2)
    queue.enqueue(torch.arange(6.0).reshape(3, 2), _ids(0, 1, 2))
    assert queue.ordered_candidates()[1].tolist() == [0, 1, 2]
    queue.enqueue(torch.arange(8.0).reshape(4, 2) + 100, _ids(3, 4, 5, 6))  # wraps: 5, 6 overwrite 0, 1
    assert queue.item_ids.tolist() == [5, 6, 2, 3, 4]
    embeds, ids = queue.ordered_candidates()
    assert ids.tolist() == [2, 3, 4, 5, 6]
    torch.testing.assert_close(embeds[-1], torch.tensor([106.0, 107.0]) / math.hypot(106.0, 107.0))
    queue.enqueue(torch.zeros(7, 2), _ids(10, 11, 12, 13, 14, 15, 16))  # more than size: last 5 kept
    assert queue.ordered_candidates()[1].tolist() == [12, 13, 14, 15, 16]
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        queue.enqueue(torch.zeros(2, 3), _ids(1, 2))


def test_queue_fills_only_in_training_mode():
    loss_fn = InfoNCELoss(temperature=TAU, queue_size=8)
    args = (torch.randn(3, 4), torch.randn(3, 4), _ids(0, 1, 2), _ids(3, 4, 5))
    loss_fn.eval()(*args)
    assert len(loss_fn.queue) == 0
    loss_fn.train()(*args)
    assert loss_fn.queue.ordered_candidates()[1].tolist() == [3, 4, 5]


def test_queue_state_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 20, (4,)), torch.randint(0, 20, (4,)))
               for _ in range(5)]
    trained = InfoNCELoss(temperature=TAU, queue_size=10, learnable_temperature=True)
    for batch in batches[:3]:
        trained(*batch)
    save_file(trained.state_dict(), tmp_path / "loss.safetensors")
    resumed = InfoNCELoss(temperature=TAU, queue_size=10, learnable_temperature=True)
    resumed.load_state_dict(load_file(tmp_path / "loss.safetensors"))
    for batch in batches[3:]:
        assert resumed(*batch).item() == trained(*batch).item()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match=r"\(10, 6\).*\(12, 6\)"):
        InfoNCELoss(queue_size=12, embed_dim=6).load_state_dict(trained.state_dict())


def test_queue_larger_than_catalogue_warns_once_and_stays_correct():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn = InfoNCELoss(temperature=TAU, queue_size=12, catalogue_size=4)
        generator = torch.Generator().manual_seed(1)
        for _ in range(4):  # 16 enqueued rows over 4 items: copies in the queue
            anchor_ids = torch.randint(0, 4, (4,), generator=generator)
            positive_ids = torch.randint(0, 4, (4,), generator=generator)
            anchors, positives = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
            queue_embeds, queue_ids = (t.clone() for t in loss_fn.init_queue(3).candidates())
            loss = loss_fn(anchors, positives, anchor_ids, positive_ids)
            expected = reference_infonce(anchors, positives, anchor_ids, positive_ids, TAU,
                                         queue=queue_embeds, queue_ids=queue_ids)
            assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    messages = [str(w.message) for w in caught if "exceeds the catalogue size" in str(w.message)]
    assert len(messages) == 1 and "12" in messages[0] and "4" in messages[0]


def test_learnable_temperature_trains():
    fixed = InfoNCELoss(temperature=0.07)
    assert list(fixed.parameters()) == [] and fixed.temperature == pytest.approx(0.07)
    loss_fn = InfoNCELoss(temperature=0.07, learnable_temperature=True)
    assert loss_fn.temperature == pytest.approx(0.07)
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.5)
    anchors, positives = _leaf(6, 4, seed=12), _leaf(6, 4, seed=13)
    loss = loss_fn(anchors, positives, _ids(0, 1, 2, 3, 4, 5), _ids(6, 7, 8, 9, 10, 11))
    loss.backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad.item() != 0.0
    optimizer.step()
    assert loss_fn.temperature != pytest.approx(0.07)
    assert "logit_scale" in loss_fn.state_dict()
    with pytest.raises(ValueError, match="temperature must be >= 0.01.*0.001"):
        InfoNCELoss(temperature=0.001)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"anchor_item_ids": _ids(0, -1, 2)}, ValueError, r"ids must be >= 0.*-1"),
        ({"positives": torch.randn(3, 5)}, ValueError, r"\(3, 4\).*\(3, 5\)"),
        ({"positive_item_ids": _ids(0, 1)}, ValueError, r"positive_item_ids must be \(3,\).*\(2,\)"),
        ({"positive_item_ids": torch.tensor([0.0, 1.0, 2.0])}, TypeError, r"int64"),
        ({"hard_negatives": torch.randn(3, 2, 4)}, ValueError, r"given together"),
        ({"hard_negatives": torch.randn(3, 2, 5), "hard_negative_ids": torch.zeros(3, 2, dtype=torch.int64)},
         ValueError, r"\(3, H, 4\).*\(3, 2, 5\)"),
        ({"pair_mask": torch.ones(3)}, TypeError, r"bool"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(kwargs, error, pattern):
    inputs = {"anchors": torch.randn(3, 4), "positives": torch.randn(3, 4),
              "anchor_item_ids": _ids(0, 1, 2), "positive_item_ids": _ids(3, 4, 5)}
    inputs.update(kwargs)
    with pytest.raises(error, match=pattern):
        InfoNCELoss()(**inputs)


# ---- multi-level ------------------------------------------------------------------------

def _encoder_outputs(seed, batch, dim=4, with_images=True, image_mask=None):
    return SimpleNamespace(
        item_embeds=_leaf(batch, dim, seed=seed),
        text_embeds=_leaf(batch, dim, seed=seed + 100),
        image_embeds=_leaf(batch, dim, seed=seed + 200) if with_images else None,
        image_mask=image_mask,
    )


def test_multilevel_with_partial_images_matches_per_level_losses():
    trigger = _encoder_outputs(1, 5, image_mask=torch.tensor([True, True, False, True, True]))
    target = {"item_embeds": _leaf(5, 4, seed=2), "text_embeds": _leaf(5, 4, seed=3),
              "image_embeds": _leaf(5, 4, seed=4), "image_mask": torch.tensor([True, False, True, True, True])}
    trigger_ids, target_ids = _ids(0, 1, 2, 3, 4), _ids(5, 6, 7, 5, 8)
    loss_fn = MultiLevelInfoNCE(temperature=TAU)
    total, levels = loss_fn(trigger, target, trigger_ids, target_ids)

    def level(anchors, positives, keep=None):
        keep = torch.ones(5, dtype=torch.bool) if keep is None else keep
        return reference_infonce(anchors[keep], positives[keep], trigger_ids[keep], target_ids[keep], TAU).item()

    both = trigger.image_mask & target["image_mask"]
    expected = {
        "item": level(trigger.item_embeds, target["item_embeds"]),
        "text": level(trigger.text_embeds, target["text_embeds"]),
        "image": level(trigger.image_embeds, target["image_embeds"], both),
        "cross": 0.5 * (level(trigger.text_embeds, target["image_embeds"], target["image_mask"])
                        + level(trigger.image_embeds, target["text_embeds"], trigger.image_mask)),
    }
    assert levels.keys() == expected.keys()
    for name, value in expected.items():
        assert levels[name] == pytest.approx(value, rel=1e-5), name
    weighted = 1.0 * expected["item"] + 0.5 * expected["text"] + 0.5 * expected["image"] + 0.25 * expected["cross"]
    assert total.item() == pytest.approx(weighted, rel=1e-5)

    total.backward()
    for side in (vars(trigger), target):
        for field in ("item_embeds", "text_embeds", "image_embeds"):
            assert side[field].grad is not None and side[field].grad.abs().sum() > 0, field


def test_multilevel_text_only_skips_image_levels():
    trigger, target = _encoder_outputs(5, 4, with_images=False), _encoder_outputs(6, 4, with_images=False)
    total, levels = MultiLevelInfoNCE(temperature=TAU)(trigger, target, _ids(0, 1, 2, 3), _ids(4, 5, 6, 7))
    assert set(levels) == {"item", "text"}
    assert total.item() == pytest.approx(levels["item"] + 0.5 * levels["text"], rel=1e-6)
    total.backward()
    assert trigger.item_embeds.grad.abs().sum() > 0 and target.text_embeds.grad.abs().sum() > 0


def test_multilevel_each_level_has_its_own_queue_and_hard_negatives():
    loss_fn = MultiLevelInfoNCE(temperature=TAU, queue_size=16, weights={"item": 1.0, "image": 1.0, "cross": 1.0})
    assert set(loss_fn.directions) == {"item", "image", "cross_text_to_image", "cross_image_to_text"}
    trigger, target = _encoder_outputs(7, 3), _encoder_outputs(8, 3)
    hard = _encoder_outputs(9, 6, image_mask=torch.tensor([True, False, True, True, True, True]))  # flat B*H
    hard_ids = _ids(20, 21, 22, 23, 24, 25).reshape(3, 2)
    total, levels = loss_fn(trigger, target, _ids(0, 1, 2), _ids(3, 4, 5),
                            hard_negative_outputs=hard, hard_negative_ids=hard_ids)
    total.backward()
    assert hard.image_embeds.grad[1].abs().sum() == 0 and hard.image_embeds.grad[0].abs().sum() > 0
    queues = {name: loss.queue.candidates()[0] for name, loss in loss_fn.directions.items()}
    torch.testing.assert_close(queues["item"], torch.nn.functional.normalize(target.item_embeds.detach(), dim=-1))
    torch.testing.assert_close(queues["cross_image_to_text"],
                               torch.nn.functional.normalize(target.text_embeds.detach(), dim=-1))
    assert torch.equal(queues["image"], queues["cross_text_to_image"])  # both hold target images
    with pytest.raises(ValueError, match="unknown loss levels"):
        MultiLevelInfoNCE(weights={"audio": 1.0})


def test_csft_target_log_prior_is_train_target_frequency():
    from mim_hf.csft.train import target_log_prior

    batches = SimpleNamespace(target_rows=torch.tensor([2, 2, 2, 0]), items=list(range(4)))
    prior = target_log_prior(batches)
    # counts [1, 0->1 (floor), 3, 0->1] over 6
    torch.testing.assert_close(prior, torch.log(torch.tensor([1, 1, 3, 1]) / 6.0))
