"""Dead-code revival (``vq.revival``): which codes count as dead, where they move, and that a
quantizer without it keeps its old checkpoint layout."""

from __future__ import annotations

import pytest
import torch

from provq_lightning.vq.quantizer import VectorQuantizer
from provq_lightning.vq.revival import dead_codes, draw_replacements


def test_dead_codes_are_those_below_the_fraction_of_the_mean():
    usage = torch.tensor([10.0, 0.0, 0.4, 9.6])  # mean 5
    assert dead_codes(usage, 0.1).tolist() == [1, 2]
    assert dead_codes(usage, 0.05).tolist() == [1]


def test_replacements_follow_the_quantization_error():
    latents = torch.arange(6, dtype=torch.float32).view(6, 1)
    error = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0])
    gen = torch.Generator().manual_seed(0)
    picked = draw_replacements(latents, error, 2, gen)
    assert sorted(picked.flatten().tolist()) == [4.0, 5.0]
    # More dead codes than latents: every latent once, no repeats.
    assert draw_replacements(latents, error, 10, gen).shape == (6, 1)


def _trained(threshold: float, steps: int = 30) -> VectorQuantizer:
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, dead_code_threshold=threshold, dead_code_decay=0.8)
    # Codes 4..7 sit far from all data: plain VQ never picks them again.
    q.set_codebook(torch.cat([torch.randn(4, 2) * 0.1, torch.full((4, 2), 50.0)]))
    q.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        q(torch.randn(64, 2, generator=gen) * 2)
    return q


def test_unused_codes_move_onto_the_data_and_get_used():
    q = _trained(0.1)
    assert int(q.revival.revived_total) >= 4
    assert q.codebook().detach().abs().max() < 20  # none left at 50
    used = torch.unique(q(torch.randn(512, 2) * 2).indices).numel()
    assert used == 8


def test_without_revival_far_codes_stay_dead_and_the_state_dict_is_unchanged():
    q = _trained(0.0)
    assert q.revival is None
    assert (q.codebook().detach() == 50.0).all(dim=1).sum() == 4
    assert set(q.state_dict()) == {"embedding.weight"}


def test_padding_is_not_counted_and_eval_never_moves_codes():
    q = _trained(0.1, steps=0)
    before = q.codebook().detach().clone()
    q.eval()
    for _ in range(20):
        q(torch.randn(64, 2))
    assert torch.equal(q.codebook().detach(), before)
    q.train()
    # Padded items sit exactly on the far codes: counted, they would keep code 4 alive.
    gen = torch.Generator().manual_seed(2)
    z = torch.full((1, 64, 2), 50.0)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, :32] = True
    for _ in range(10):
        z[0, :32] = torch.randn(32, 2, generator=gen)
        q(z, mask=mask)
    assert not (q.codebook().detach() == 50.0).all(dim=1).any()


def test_seeding_restarts_the_use_history():
    q = _trained(0.1)
    q.set_codebook(torch.randn(8, 2))
    assert int(q.revival.steps) == 0 and float(q.revival.usage.sum()) == 0.0


def test_revival_state_round_trips_and_bad_settings_are_refused():
    q = _trained(0.1)
    fresh = VectorQuantizer(8, 2, dead_code_threshold=0.1, dead_code_decay=0.8)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.revival.usage, q.revival.usage)
    assert int(fresh.revival.revived_total) == int(q.revival.revived_total)
    with pytest.raises(ValueError, match="dead_code_threshold must be in"):
        VectorQuantizer(8, 2, dead_code_threshold=1.5)
    with pytest.raises(ValueError, match="plain codebook"):
        VectorQuantizer(8, 2, dead_code_threshold=0.1, linear_codebook=True)


def test_a_resumed_quantizer_revives_exactly_as_the_uninterrupted_one():
    def batches():
        gen = torch.Generator().manual_seed(3)
        return [torch.randn(64, 2, generator=gen) * 2 for _ in range(30)]

    def fresh() -> VectorQuantizer:
        torch.manual_seed(0)
        q = VectorQuantizer(8, 2, dead_code_threshold=0.1, dead_code_decay=0.8)
        q.set_codebook(torch.cat([torch.randn(4, 2) * 0.1, torch.full((4, 2), 50.0)]))
        return q.train()

    straight = fresh()
    for z in batches():
        straight(z)
    first = fresh()
    for z in batches()[:4]:  # before the first revival (step 5): the resumed run makes them
        first(z)
    resumed = VectorQuantizer(8, 2, dead_code_threshold=0.1, dead_code_decay=0.8).train()
    resumed.load_state_dict(first.state_dict())
    for z in batches()[4:]:
        resumed(z)
    assert int(first.revival.revived_total) == 0 < int(resumed.revival.revived_total)
    assert torch.equal(resumed.codebook(), straight.codebook())
    assert torch.equal(resumed.revival.usage, straight.revival.usage)
