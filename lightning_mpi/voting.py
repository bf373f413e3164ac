"""Combining ensemble members: pure functions over stacked member outputs, usable without MPI.

Every function takes ``outputs`` of shape ``[members, batch, ...]``: for classification the members' logits
``[members, batch, classes]``, for regression their predictions ``[members, batch, ...]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def hard_vote(logits: Tensor) -> Tensor:
    """Majority vote over the members' predicted classes; returns class indices ``[batch]``.

    Ties go to the tied class with the larger summed probability, then to the lowest class index.

    >>> logits = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]], [[0.0, 3.0, 0.0]]])
    >>> hard_vote(logits)
    tensor([1])
    >>> tie = torch.tensor([[[3.0, 0.0]], [[0.0, 1.0]]])  # one vote each; member 0 is more confident
    >>> hard_vote(tie)
    tensor([0])
    >>> hard_vote(torch.zeros(2, 1, 3))  # complete tie: lowest index
    tensor([0])
    """
    return hard_vote_scores(logits).argmax(dim=-1)


def hard_vote_scores(logits: Tensor) -> Tensor:
    """Log vote shares ``[batch, classes]`` whose argmax is :func:`hard_vote` (usable as logits downstream).

    The share of class ``c`` is its number of votes plus a tie-breaker below one vote (summed probability
    over ``members + 1``), normalised to sum to one.

    >>> logits = torch.tensor([[[2.0, 0.0]], [[2.0, 0.0]], [[0.0, 2.0]]])
    >>> hard_vote_scores(logits).exp().sum(-1)
    tensor([1.])
    >>> hard_vote_scores(logits).argmax(-1)
    tensor([0])
    """
    members, classes = logits.shape[0], logits.shape[-1]
    probs = logits.float().softmax(dim=-1)
    votes = torch.nn.functional.one_hot(logits.argmax(dim=-1), classes).sum(dim=0).to(probs.dtype)
    scores = votes + probs.sum(dim=0) / (members + 1)
    return (scores / scores.sum(dim=-1, keepdim=True)).log()


def soft_vote(logits: Tensor) -> Tensor:
    """Mean of the members' class probabilities, ``[batch, classes]``.

    >>> logits = torch.tensor([[[0.0, 0.0]], [[0.0, 20.0]]])
    >>> soft_vote(logits).round(decimals=3)
    tensor([[0.2500, 0.7500]])
    """
    return logits.float().softmax(dim=-1).mean(dim=0)


def soft_vote_log_probs(logits: Tensor) -> Tensor:
    """Log of :func:`soft_vote`: a valid logit tensor (``softmax`` of it gives the mean probabilities back).

    >>> logits = torch.tensor([[[0.0, 0.0]], [[0.0, 20.0]]])
    >>> soft_vote_log_probs(logits).softmax(-1).round(decimals=3)
    tensor([[0.2500, 0.7500]])
    """
    return soft_vote(logits).log()


def mean_vote(outputs: Tensor) -> Tensor:
    """Mean of the members' predictions (regression).

    >>> mean_vote(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    tensor([2., 4.])
    """
    return outputs.mean(dim=0)


def median_vote(outputs: Tensor) -> Tensor:
    """Median of the members' predictions (regression; robust to one bad member). An even number of members
    gives the mean of the two middle predictions.

    >>> median_vote(torch.tensor([[1.0], [2.0], [100.0]]))
    tensor([2.])
    >>> median_vote(torch.tensor([[1.0, 5.0], [3.0, 4.0]]))
    tensor([2.0000, 4.5000])
    """
    ordered = outputs.sort(dim=0).values
    middle = ordered.shape[0] // 2
    if ordered.shape[0] % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


#: votings that need class scores (logits) in the last dimension
CLASS_VOTINGS = ("hard", "soft")


def check_fits(voting: str, outputs: Tensor) -> None:
    """Raise a ``ValueError`` saying what to choose if ``voting`` cannot combine member ``outputs`` ``[members, ...]``.

    Hard and soft voting combine class scores: each member's output must be ``[batch, classes]`` (or more
    dimensions) of floats with at least two classes. A regression output (one column) needs ``"mean"`` or
    ``"median"``.

    >>> check_fits("mean", torch.zeros(2, 4, 1))
    >>> check_fits("hard", torch.zeros(2, 4, 1))
    Traceback (most recent call last):
    ...
    ValueError: voting='hard' combines class scores, but each member's output has shape (4, 1) ...
    """
    if voting not in CLASS_VOTINGS:
        if not outputs.is_floating_point():
            raise ValueError(
                f"voting={voting!r} averages predictions, but the members' outputs are {outputs.dtype}: return "
                "floating-point predictions from forward."
            )
        return
    member_shape = tuple(outputs.shape[1:])
    if outputs.is_floating_point() and len(member_shape) >= 2 and member_shape[-1] >= 2:
        return
    raise ValueError(
        f"voting={voting!r} combines class scores, but each member's output has shape {member_shape} "
        f"({outputs.dtype}); it needs floating-point logits [batch, classes] with at least 2 classes. For "
        "regression (one value per sample) use MPIStrategy(sync='ensemble', voting='mean') or voting='median'."
    )


#: What each ``voting`` name combines stacked member outputs with (the ensemble forward's output).
COMBINERS: dict[str, Callable[[Tensor], Tensor]] = {
    "hard": hard_vote_scores,
    "soft": soft_vote_log_probs,
    "mean": mean_vote,
    "median": median_vote,
}


def combiner(name: str) -> Callable[[Tensor], Tensor]:
    """The function that turns stacked member outputs ``[members, batch, ...]`` into the ensemble's output.

    >>> combiner("mean")(torch.tensor([[1.0], [3.0]]))
    tensor([2.])
    >>> combiner("vote")
    Traceback (most recent call last):
    ...
    ValueError: voting='vote' is not known: choose one of ['hard', 'mean', 'median', 'soft'].
    """
    if name not in COMBINERS:
        raise ValueError(f"voting={name!r} is not known: choose one of {sorted(COMBINERS)}.")
    return COMBINERS[name]
