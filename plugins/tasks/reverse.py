"""``reverse``: a verifiable instruction-following task — write a short list of letters backwards."""

from __future__ import annotations

import random
import string
from functools import cached_property

from alignkit import Demonstration, Task

#: How a faulty demonstrator gets an answer wrong; each fault changes the answer.
FAULTS = ("swap", "substitute", "copy", "extra")


def reverse_letters(letters: list[str]) -> list[str]:
    """The correct answer: ``letters`` in reverse order."""
    return letters[::-1]


def parse_letters(prompt: str) -> list[str]:
    """The letters of a prompt ``"reverse : c a f b"`` (the words after the colon)."""
    head, _, tail = prompt.partition(":")
    if head.strip() != "reverse":
        raise ValueError(f"not a reverse prompt: {prompt!r}")
    return tail.split()


def reverse_gold(prompt: str, response: str) -> float:
    """Gold reward ``2·acc − 1 − 0.2·min(extra, 5)`` (see :class:`ReverseTask`)."""
    target = reverse_letters(parse_letters(prompt))
    words = response.split()
    matches = sum(w == t for w, t in zip(words, target))
    accuracy = matches / len(target)
    extra = max(0, len(words) - len(target))
    return 2.0 * accuracy - 1.0 - 0.2 * min(extra, 5)


def corrupt(answer: list[str], alphabet: list[str], rng: random.Random) -> list[str]:
    """A wrong version of ``answer`` made by a random fault from :data:`FAULTS`:

    ``swap`` two adjacent different letters, ``substitute`` one letter by another, ``copy`` the
    prompt's order instead of reversing it, or append one ``extra`` letter. A fault that would leave
    the answer unchanged (swap of equal letters, copy of a palindrome) becomes a substitution.
    """
    fault = rng.choice(FAULTS)
    wrong = list(answer)
    if fault == "swap":
        spots = [i for i in range(len(wrong) - 1) if wrong[i] != wrong[i + 1]]
        if spots:
            i = rng.choice(spots)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
            return wrong
    elif fault == "copy" and wrong != wrong[::-1]:
        return wrong[::-1]
    elif fault == "extra":
        return wrong + [rng.choice(alphabet)]
    i = rng.randrange(len(wrong))
    wrong[i] = rng.choice([c for c in alphabet if c != wrong[i]])
    return wrong


class ReverseTask(Task):
    """Reverse a list of letters: prompt ``"reverse : c a f b"``, correct response ``"b f a c"``.

    Letters are the first ``alphabet_size`` lowercase letters, written space-separated; a list has
    ``min_length`` to ``max_length`` letters (length uniform, then letters uniform with repetition).
    Responses end with the tokenizer's EOS (``stop`` is None).

    Gold reward, with target ``t`` (the reversed list, length ``L``) and response words ``r``
    (``response.split()``)::

        acc   = #{i < min(L, len(r)) : r[i] == t[i]} / L      # partial credit per position
        extra = max(0, len(r) − L)                             # words after the answer
        gold  = 2·acc − 1 − 0.2·min(extra, 5)                  # in [−2, 1]

    A perfect answer scores 1, an empty one −1. Demonstrations are correct except for a fraction
    ``error_rate`` of them, each made wrong by one fault (adjacent swap, substituted letter,
    unreversed copy, or one extra letter), so the demonstrator's mean gold is below 1.

    Args:
        seed: Seed of every random choice the task makes (prompts, demonstrations).
        num_train_prompts: Number of distinct training prompts (one demonstration each).
        num_eval_prompts: Number of distinct evaluation prompts, disjoint from the training prompts.
        error_rate: Fraction of demonstrations that are deliberately wrong.
        min_length: Fewest letters in a prompt's list.
        max_length: Most letters in a prompt's list.
        alphabet_size: Number of distinct letters used (the first ones of a–z).
    """

    name = "reverse"

    def __init__(self, seed: int = 0, num_train_prompts: int = 2000, num_eval_prompts: int = 128,
                 error_rate: float = 0.3, min_length: int = 3, max_length: int = 5,
                 alphabet_size: int = 8) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError("error_rate must lie in [0, 1]")
        if not 1 <= min_length <= max_length:
            raise ValueError("need 1 <= min_length <= max_length")
        if not 2 <= alphabet_size <= 26:
            raise ValueError("alphabet_size must lie in [2, 26]")
        self.error_rate = error_rate
        self.min_length = min_length
        self.max_length = max_length
        self.alphabet = list(string.ascii_lowercase[:alphabet_size])
        super().__init__(seed, num_train_prompts, num_eval_prompts)

    def sample_prompt(self, rng: random.Random) -> str:
        length = rng.randint(self.min_length, self.max_length)
        return "reverse : " + " ".join(rng.choice(self.alphabet) for _ in range(length))

    def prompt_space_size(self) -> int:
        k = len(self.alphabet)
        return sum(k ** n for n in range(self.min_length, self.max_length + 1))

    def demonstrations(self, n: int | None = None) -> list[Demonstration]:
        return self._take(self._demonstrations, n)

    @cached_property
    def _demonstrations(self) -> list[Demonstration]:
        """One demonstration per training prompt, wrong with probability ``error_rate``."""
        rng = self.rng("demonstrations")
        demos = []
        for prompt in self.train_prompts():
            answer = reverse_letters(parse_letters(prompt))
            if rng.random() < self.error_rate:
                answer = corrupt(answer, self.alphabet, rng)
            demos.append(Demonstration(prompt, " ".join(answer)))
        return demos

    def gold_reward(self, prompt: str, response: str) -> float:
        return reverse_gold(prompt, response)

    def corpus(self) -> list[str]:
        prompts = self.train_prompts() + self.eval_prompts()
        answers = [" ".join(reverse_letters(parse_letters(p))) for p in prompts]
        return ["reverse : " + " ".join(self.alphabet)] + prompts + answers
