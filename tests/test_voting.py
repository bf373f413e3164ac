"""Voting functions: pure tensor code, no MPI."""

import torch

from lightning_mpi.voting import hard_vote, hard_vote_scores, mean_vote, median_vote, soft_vote


def one_hot_logits(classes: list[int], num_classes: int = 4, confidence: float = 5.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float().mul(confidence).unsqueeze(1)


def test_majority_wins():
    assert hard_vote(one_hot_logits([2, 2, 1])).tolist() == [2]


def test_tie_broken_by_summed_probability_then_lowest_index():
    # classes 1 and 3 have one vote each; the member voting 3 is more confident
    logits = torch.cat([one_hot_logits([1], confidence=1.0), one_hot_logits([3], confidence=6.0)])
    assert hard_vote(logits).tolist() == [3]
    # perfectly symmetric tie: the lowest class index
    logits = torch.cat([one_hot_logits([3]), one_hot_logits([1])])
    assert hard_vote(logits).tolist() == [1]


def test_hard_vote_scores_are_log_probabilities_with_the_vote_as_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 100, 7, generator=g)
    scores = hard_vote_scores(logits)
    assert torch.allclose(scores.exp().sum(-1), torch.ones(100))
    votes = torch.nn.functional.one_hot(logits.argmax(-1), 7).sum(0)
    assert torch.equal(votes.gather(1, hard_vote(logits)[:, None]).squeeze(1), votes.max(-1).values)


def test_soft_vote_is_mean_probability():
    logits = torch.randn(3, 10, 4)
    assert torch.allclose(soft_vote(logits), logits.softmax(-1).mean(0))


def test_regression_combiners():
    outputs = torch.tensor([[1.0], [2.0], [30.0]])
    assert mean_vote(outputs).item() == 11.0
    assert median_vote(outputs).item() == 2.0
