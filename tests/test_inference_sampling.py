"""Next-token choice: greedy, temperature, top-p, seeds, bad settings.

Reference: probabilities written out by hand for a 4-token vocabulary (softmax of log
probabilities, the nucleus cut where the mass of the tokens before reaches ``top_p``); sampled
frequencies over 20000 seeded draws within 0.02 of those probabilities.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longvila.inference.sampling import (
    SamplingParams,
    choose_next_token,
    nucleus_probabilities,
)

PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])
LOGITS = PROBS.log()


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (1.0, [0.15, 0.5, 0.05, 0.3]),
        # Mass 0.5 before token 3 (kept), 0.8 before token 0 (not below 0.79: cut).
        (0.79, [0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]),
        (0.81, [0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95]),
        (0.1, [0.0, 1.0, 0.0, 0.0]),  # the most likely token is always kept
    ],
)
def test_nucleus_keeps_the_smallest_set_reaching_top_p(top_p, expected):
    got = nucleus_probabilities(LOGITS, temperature=1.0, top_p=top_p)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


def test_temperature_sharpens_and_flattens():
    for temperature in (0.5, 2.0):
        powered = PROBS ** (1 / temperature)
        expected = powered / powered.sum()
        got = nucleus_probabilities(LOGITS, temperature, top_p=1.0)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_greedy_takes_the_argmax_lowest_id_on_ties():
    params = SamplingParams()
    assert params.greedy
    assert choose_next_token(LOGITS, params, params.new_generator()) == 1
    tied = torch.tensor([0.0, 3.0, 1.0, 3.0])
    assert choose_next_token(tied, params, params.new_generator()) == 1


def test_sampling_follows_the_nucleus_and_repeats_with_the_seed():
    params = SamplingParams(temperature=1.0, top_p=0.81, seed=5)
    generator = params.new_generator()
    draws = [choose_next_token(LOGITS, params, generator) for _ in range(20000)]
    counts = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    expected = nucleus_probabilities(LOGITS, 1.0, 0.81)
    assert counts[2] == 0, "outside the nucleus"
    assert (counts - expected).abs().max() < 0.02, counts
    again = params.new_generator()
    assert [choose_next_token(LOGITS, params, again) for _ in range(50)] == draws[:50]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"temperature": -0.1}, r"temperature must be >= 0 \(0 = greedy\), got -0.1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**settings)


def test_logits_must_be_one_row():
    params = SamplingParams()
    with pytest.raises(ValueError, match=r"logits must be \[vocab\]"):
        choose_next_token(torch.zeros(2, 4), params, params.new_generator())


def test_banned_tokens_are_never_chosen():
    greedy = SamplingParams(banned_token_ids=[1])
    assert choose_next_token(LOGITS, greedy, greedy.new_generator()) == 3
    sampled = SamplingParams(temperature=1.0, banned_token_ids=(1, 3), seed=2)
    generator = sampled.new_generator()
    draws = {choose_next_token(LOGITS, sampled, generator) for _ in range(200)}
    assert draws == {0, 2}
