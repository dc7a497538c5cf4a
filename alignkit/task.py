"""The task plugin interface: prompts, imperfect demonstrations and a gold reward that simulates
human feedback.

A task owns a known *gold* reward. A :class:`SimulatedAnnotator` turns gold rewards into noisy
pairwise preferences (Bradley–Terry on gold, then random label flips, as in AlpacaFarm), so the whole
RLHF pipeline — SFT, reward modelling, policy optimisation — can be run and judged against the
ground truth without human labels.
"""

from __future__ import annotations

import abc
import math
import random
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import ClassVar

from alignkit.seeds import ANNOTATOR, resolve_seed


@dataclass(frozen=True)
class Demonstration:
    """One supervised example: the response a (simulated, fallible) demonstrator wrote for a prompt."""

    prompt: str
    response: str


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison.

    ``gold_chosen`` / ``gold_rejected`` are the task's gold rewards of the two responses, and
    ``p_chosen`` is the annotator's Bradley–Terry probability that ``chosen`` is preferred, computed
    before the random label flip (so a flipped pair has ``p_chosen < 0.5`` when the gold gap is large).
    """

    prompt: str
    chosen: str
    rejected: str
    gold_chosen: float
    gold_rejected: float
    p_chosen: float


@dataclass(frozen=True)
class Lexicon:
    """The words a task's responses are judged by, for rule-based judges that check responses word by word
    (e.g. the constitutional plugin's ``RuleFeedback``): what they know of a task besides its prompts. Words are
    lower case.

    Args:
        positive: words that praise.
        negative: words that disparage.
        ignored: words whose repetition is natural (never counted as repeated), e.g. function words.
        topics: words a prompt's topic can be; the first of them in a prompt is its topic.
        max_words: the longest concise response, in words; None: the task sets no limit.
    """

    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    ignored: frozenset[str] = frozenset()
    topics: tuple[str, ...] = ()
    max_words: int | None = None


class Task(abc.ABC):
    """A simulated-feedback task: prompts, demonstrations and an exact gold reward.

    Prompts are drawn by :meth:`sample_prompt` from a seeded random stream; the first
    ``num_eval_prompts`` distinct prompts form the evaluation set and the next ``num_train_prompts``
    distinct prompts the training set, so the two sets are disjoint and fixed by ``seed``.

    Subclasses set ``name``, implement :meth:`sample_prompt`, :meth:`prompt_space_size`,
    :meth:`demonstrations`, :meth:`gold_reward` and :meth:`corpus`, and may override ``stop`` and
    :meth:`lexicon`.

    Args:
        seed: Seed of every random choice the task makes (prompts, demonstrations).
        num_train_prompts: Number of distinct training prompts (one demonstration each).
        num_eval_prompts: Number of distinct evaluation prompts, disjoint from the training prompts.
    """

    name: ClassVar[str]
    #: Text that ends a response besides the tokenizer's end-of-sequence token; ``None`` means the
    #: task relies on EOS alone.
    stop: ClassVar[str | None] = None

    def __init__(self, seed: int = 0, num_train_prompts: int = 2000, num_eval_prompts: int = 128) -> None:
        if num_train_prompts < 0 or num_eval_prompts < 0:
            raise ValueError("num_train_prompts and num_eval_prompts must be non-negative")
        needed = num_train_prompts + num_eval_prompts
        if needed > self.prompt_space_size():
            raise ValueError(
                f"{type(self).__name__} has only {self.prompt_space_size()} distinct prompts, "
                f"but {needed} were asked for"
            )
        self.seed = seed
        self.num_train_prompts = num_train_prompts
        self.num_eval_prompts = num_eval_prompts

    # ----------------------------------------------------------------------------------- prompts

    @abc.abstractmethod
    def sample_prompt(self, rng: random.Random) -> str:
        """Draw one prompt uniformly (or by any fixed law) from the task's prompt space."""

    @abc.abstractmethod
    def prompt_space_size(self) -> int:
        """Number of distinct prompts :meth:`sample_prompt` can return (bounds the set sizes)."""

    def rng(self, purpose: str) -> random.Random:
        """A random stream fixed by the task name, ``seed`` and ``purpose`` (independent per purpose)."""
        return random.Random(f"{self.name}:{self.seed}:{purpose}")

    @cached_property
    def _prompt_split(self) -> tuple[list[str], list[str]]:
        """(eval prompts, train prompts): distinct prompts in order of first appearance."""
        rng = self.rng("prompts")
        seen: set[str] = set()
        ordered: list[str] = []
        while len(ordered) < self.num_eval_prompts + self.num_train_prompts:
            prompt = self.sample_prompt(rng)
            if prompt not in seen:
                seen.add(prompt)
                ordered.append(prompt)
        return ordered[:self.num_eval_prompts], ordered[self.num_eval_prompts:]

    def train_prompts(self) -> list[str]:
        """The ``num_train_prompts`` training prompts (deterministic for ``seed``)."""
        return list(self._prompt_split[1])

    def eval_prompts(self) -> list[str]:
        """The ``num_eval_prompts`` evaluation prompts, disjoint from :meth:`train_prompts`."""
        return list(self._prompt_split[0])

    # ------------------------------------------------------------------------------ data, reward

    @abc.abstractmethod
    def demonstrations(self, n: int | None = None) -> list[Demonstration]:
        """SFT data: one demonstration per training prompt, in prompt order, the first ``n`` of them
        (all when ``n`` is None). Deliberately imperfect, so that there is something left to align."""

    @abc.abstractmethod
    def gold_reward(self, prompt: str, response: str) -> float:
        """The exact gold reward of ``response`` to ``prompt``."""

    def gold_rewards(self, prompts: list[str], responses: list[str]) -> list[float]:
        """:meth:`gold_reward` of each (prompt, response) pair."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [self.gold_reward(p, r) for p, r in zip(prompts, responses)]

    @abc.abstractmethod
    def corpus(self) -> list[str]:
        """Texts covering every word the task's prompts and responses (good, bad or reward-hacked)
        can use; used to train a tokenizer for a model trained from scratch."""

    def lexicon(self) -> Lexicon | None:
        """The words the task's responses are judged by (:class:`Lexicon`), for rule-based judges; None (the
        default): the task has none, and a judge that needs words must be given them."""
        return None

    def _take(self, demos: list[Demonstration], n: int | None) -> list[Demonstration]:
        """The first ``n`` demonstrations (all when ``n`` is None); helper for subclasses."""
        if n is None:
            return list(demos)
        if not 0 <= n <= len(demos):
            raise ValueError(f"asked for {n} demonstrations, the task has {len(demos)} training prompts")
        return demos[:n]


def bradley_terry(gold_a: float, gold_b: float, temperature: float) -> float:
    """P(a ≻ b) = σ((gold_a − gold_b) / temperature). At temperature 0 this is 1 if a has the higher
    gold reward, 0 if b has, and 0.5 on a tie."""
    delta = gold_a - gold_b
    if temperature == 0.0 or delta == 0.0:
        return 0.5 if delta == 0.0 else float(delta > 0.0)
    x = delta / temperature
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass
class SimulatedAnnotator:
    """A noisy simulated human labeller.

    For each pair it computes p = P(a ≻ b) = σ((g_a − g_b) / temperature) from the task's gold rewards
    (Bradley–Terry; temperature 0 means argmax, and equal gold gives 0.5), draws u₁ ~ U[0, 1) and
    prefers ``a`` iff u₁ < p, then draws u₂ ~ U[0, 1) and swaps the label iff u₂ < flip_prob.
    Both draws are taken for every pair, from one ``random.Random(seed)`` stream kept across calls:
    two annotators with the same seed given the same sequence of calls give the same labels.

    Args:
        temperature: Bradley–Terry temperature on the gold-reward gap (0 = always pick the better one).
        flip_prob: Probability of flipping each sampled label (AlpacaFarm's label noise is 0.25).
        seed: Seed of the annotator's random stream; None: derived (role ``annotator``, :mod:`alignkit.seeds`)
            from the seed of the command that labels (``alignkit collect``'s ``seed``) or, used on its own,
            from the global seed when the first pair is labelled.
    """

    temperature: float = 1.0
    flip_prob: float = 0.25
    seed: int | None = None
    _rng: random.Random | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.temperature < 0.0:
            raise ValueError("temperature must be non-negative")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError("flip_prob must lie in [0, 1]")
        self._rng = None if self.seed is None else random.Random(self.seed)

    def label(self, task: Task, prompts: list[str], responses_a: list[str],
              responses_b: list[str]) -> list[PreferencePair]:
        """Label each (prompt, a, b) triple; returns the pairs ordered as given."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError("prompts, responses_a and responses_b must have the same length")
        if self._rng is None:
            self._rng = random.Random(resolve_seed(self.seed, ANNOTATOR))
        gold_a = task.gold_rewards(prompts, responses_a)
        gold_b = task.gold_rewards(prompts, responses_b)
        pairs, rng = [], self._rng
        for prompt, a, b, ga, gb in zip(prompts, responses_a, responses_b, gold_a, gold_b):
            p_a = bradley_terry(ga, gb, self.temperature)
            a_wins = rng.random() < p_a
            if rng.random() < self.flip_prob:
                a_wins = not a_wins
            if a_wins:
                pairs.append(PreferencePair(prompt, a, b, ga, gb, p_a))
            else:
                pairs.append(PreferencePair(prompt, b, a, gb, ga, 1.0 - p_a))
        return pairs


def preference_records(pairs: list[PreferencePair]) -> list[dict]:
    """JSON-ready dicts with keys prompt, chosen, rejected, gold_chosen, gold_rejected, p_chosen."""
    return [asdict(pair) for pair in pairs]
