"""AI feedback: the critic, reviser and judge of Constitutional AI behind one small interface.

:class:`Feedback` asks three things of a feedback model, each guided by one :class:`Principle`:

- ``critique(prompt, response, principle)``: what is wrong with the response;
- ``revise(prompt, response, critique, principle)``: a rewritten response;
- ``compare(prompt, a, b, principle)``: P(a follows the principle better than b), a soft label.

Two implementations:

- :class:`LMFeedback`, the real path: any causal LM (a model directory or an HF name) reads prompts built
  from the constitution's texts. Critiques and revisions are sampled continuations (recorded as they
  come, however poor); the comparison is one forward pass over a multiple-choice prompt ending in
  ``The answer is: (``, and the soft label is the softmax of the log-probabilities of the two option
  tokens at the last position (Bai et al. 2022, §4.1).
- :class:`RuleFeedback`, a programmatic stand-in for an LM judge on the built-in tasks, whose tiny
  models cannot read instructions: each principle is checked by a rule over words (negative words,
  a missing item, repeated words, length), the critique is a templated report of what the rule found,
  the revision a deterministic fix, and the soft label a sigmoid of the rules' score difference.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from alignkit import (
    FEEDBACK,
    Lexicon,
    ModelConfig,
    SamplingConfig,
    Task,
    bradley_terry,
    derive_seed,
    left_pad,
    load_model,
    position_ids_from_mask,
    resolve_seed,
    sample_texts,
    token_logprobs,
)
from alignkit_plugins.constitutional.constitution import (
    Principle,
    comparison_prompt,
    critique_prompt,
    revision_prompt,
)


class Feedback(abc.ABC):
    """A critic, reviser and pairwise judge guided by principles. The batched methods loop over the
    single-example ones unless an implementation batches them itself."""

    @abc.abstractmethod
    def critique(self, prompt: str, response: str, principle: Principle) -> str:
        """A critique of ``response`` to ``prompt`` with respect to ``principle``."""

    @abc.abstractmethod
    def revise(self, prompt: str, response: str, critique: str, principle: Principle) -> str:
        """A revision of ``response`` that addresses ``critique`` with respect to ``principle``."""

    @abc.abstractmethod
    def compare(self, prompt: str, a: str, b: str, principle: Principle) -> float:
        """P(``a`` follows ``principle`` better than ``b``), in [0, 1]."""

    def complies(self, prompt: str, response: str, principle: Principle) -> bool | None:
        """Whether ``response`` follows ``principle`` on its own; None when the judge only compares."""
        return None

    def use_run_seed(self, seed: int) -> None:
        """Derive the seeds left unset (None) from ``seed``, the seed of the command that uses this feedback
        (:mod:`alignkit.seeds`); seeds given explicitly stay. Nothing to do for a deterministic judge."""

    def use_task(self, task: Task) -> None:
        """Take what the judge needs to know of ``task``, the task of the command that uses this feedback (e.g.
        :class:`RuleFeedback` its words, :meth:`alignkit.Task.lexicon`). Nothing to do for a judge that reads
        the principles' texts."""

    def critiques(self, prompts: list[str], responses: list[str], principles: list[Principle]) -> list[str]:
        """:meth:`critique` of each (prompt, response, principle)."""
        return [self.critique(p, r, pr) for p, r, pr in zip(prompts, responses, principles, strict=True)]

    def revisions(self, prompts: list[str], responses: list[str], critiques: list[str],
                  principles: list[Principle]) -> list[str]:
        """:meth:`revise` of each (prompt, response, critique, principle)."""
        return [self.revise(p, r, c, pr) for p, r, c, pr in zip(prompts, responses, critiques, principles, strict=True)]

    def comparisons(self, prompts: list[str], a: list[str], b: list[str], principles: list[Principle]) -> list[float]:
        """:meth:`compare` of each (prompt, a, b, principle)."""
        return [self.compare(p, x, y, pr) for p, x, y, pr in zip(prompts, a, b, principles, strict=True)]


# ------------------------------------------------------------------------------------------ LM feedback


def soft_label(logp_a: float, logp_b: float) -> float:
    """P(A) from the judge's log-probabilities of the two option tokens, normalised over the two:
    ``exp(logp_a) / (exp(logp_a) + exp(logp_b))`` (computed without overflow)."""
    top = max(logp_a, logp_b)
    ea, eb = math.exp(logp_a - top), math.exp(logp_b - top)
    return ea / (ea + eb)


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    """``text`` up to the earliest stop string (excluded), without surrounding whitespace."""
    ends = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return (text[:min(ends)] if ends else text).strip()


def option_token_ids(tokenizer, prompt: str, prompt_ids: list[int], labels: tuple[str, str],
                     chat_template: bool = False) -> tuple[int, int]:
    """The id of the token each option label starts with when it continues ``prompt``.

    Without a chat template the label's token is read off ``tokenize(prompt + label)`` after the
    prompt's own tokens (so tokenizers that mark word starts, e.g. Metaspace, give the right id);
    with one, the answer starts a fresh assistant turn and the label is tokenised alone. Raises a
    ValueError when a label gives no token or both labels start with the same token (e.g. both unknown).
    """
    ids = []
    for label in labels:
        if chat_template:
            token = tokenizer(label, add_special_tokens=False)["input_ids"][:1]
        else:
            full = tokenizer(prompt + label, add_special_tokens=False)["input_ids"]
            n = len(prompt_ids)
            token = full[n:n + 1] if full[:n] == list(prompt_ids) else []
        if not token:
            raise ValueError(f"option label {label!r} does not tokenise as one more token after the comparison "
                             f"prompt; choose other option_labels")
        ids.append(token[0])
    if ids[0] == ids[1]:
        shared = tokenizer.convert_ids_to_tokens(ids[0])
        raise ValueError(f"option labels {labels[0]!r} and {labels[1]!r} both start with the token {shared!r}; "
                         f"choose option_labels that the tokenizer tells apart")
    return ids[0], ids[1]


@torch.no_grad()
def last_position_logits(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Next-token logits after each left-padded prompt, ``(B, P) -> (B, V)``, positions taken from the mask."""
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False, **kwargs)
    return out.logits[:, -1]


class LMFeedback(Feedback):
    """A causal LM as critic, reviser and judge, prompted with the constitution's texts (see
    :mod:`alignkit_plugins.constitutional.constitution` for the exact prompts).

    The model is loaded on first use (CUDA when available). Critiques and revisions are sampled with
    ``sampling`` and cut at its first stop string. A comparison is one forward pass over the
    multiple-choice prompt; P(a) is the softmax of the log-probabilities of the two option tokens. With
    ``swap_average`` each pair is also judged with the options swapped and the two estimates of P(a)
    averaged, which cancels the judge's preference for a position.

    Args:
        model: model directory (e.g. a stage's ``model/``) or HF name of the feedback model.
        sampling: how critiques and revisions are sampled (their end is the first stop string).
        option_labels: the two option letters; the tokenizer must tell their first tokens apart.
        swap_average: judge both orders of every pair and average.
        batch_size: prompts per forward / generation batch.
        chat_template: wrap every prompt in the tokenizer's chat template as a user turn.
        seed: seed of the sampling generator; None: derived (role ``feedback``, :mod:`alignkit.seeds`) from the
            seed of the command that uses it (``cai-revise``, ``cai-feedback``), or else from the global seed.
    """

    def __init__(self, model: str, sampling: SamplingConfig = SamplingConfig(max_new_tokens=48, stop_strings=["\n\n"]),
                 option_labels: tuple[str, str] = ("A", "B"), swap_average: bool = True, batch_size: int = 16,
                 chat_template: bool = False, seed: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(option_labels) != 2 or not all(option_labels) or option_labels[0] == option_labels[1]:
            raise ValueError(f"option_labels must be two different non-empty strings, got {option_labels!r}")
        self.model_name, self.sampling, self.option_labels = model, sampling, tuple(option_labels)
        self.swap_average, self.batch_size = swap_average, batch_size
        self.chat_template, self.seed = chat_template, seed
        self._model = self._tokenizer = self._generator = None

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, **kwargs) -> LMFeedback:
        """An LMFeedback around a model already in memory (left on its device; put in eval mode)."""
        feedback = cls(model=getattr(getattr(model, "config", None), "name_or_path", "") or "<in memory>", **kwargs)
        feedback._model, feedback._tokenizer = model.eval(), tokenizer
        feedback._generator = feedback._seeded_generator(next(model.parameters()).device)
        return feedback

    def _seeded_generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(resolve_seed(self.seed, FEEDBACK))

    def use_run_seed(self, seed: int) -> None:
        if self.seed is None:
            self.seed = derive_seed(seed, FEEDBACK)
            if self._generator is not None:  # built already (from_model): restart it from the derived seed
                self._generator = self._seeded_generator(self._generator.device)

    def _load(self):
        if self._model is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model, self._tokenizer = load_model(ModelConfig(name_or_path=self.model_name), "causal_lm")
            self._model = model.to(device).eval()
            self._generator = self._seeded_generator(device)
        return self._model, self._tokenizer

    def complete(self, texts: list[str]) -> list[str]:
        """One sampled continuation per text, cut at the first stop string."""
        model, tokenizer = self._load()
        rollouts = sample_texts(model, tokenizer, texts, self.sampling, self.batch_size, self._generator,
                                self.chat_template)
        return [cut_at_stop(r, self.sampling.stop_strings) for ro in rollouts for r in ro.responses]

    def option_logprobs(self, texts: list[str]) -> Tensor:
        """``(N, 2)`` log-probabilities of the two option tokens as the next token of each text."""
        from alignkit import encode_prompt  # loads the data package: only when a comparison is made

        model, tokenizer = self._load()
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            ids = [encode_prompt(tokenizer, t, self.chat_template) for t in chunk]
            labels = torch.tensor([option_token_ids(tokenizer, t, i, self.option_labels, self.chat_template)
                                   for t, i in zip(chunk, ids)], device=device)  # (B, 2)
            input_ids, mask = left_pad(ids, pad)
            logits = last_position_logits(model, input_ids.to(device), mask.to(device))  # (B, V)
            chunks.append(token_logprobs(logits[:, None, :].expand(-1, 2, -1), labels).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 2)

    def prefer_first(self, prompts: list[str], a: list[str], b: list[str], principles: list[Principle]) -> list[float]:
        """P(option A) with ``a`` shown as option A and ``b`` as option B."""
        texts = [comparison_prompt(p, x, y, pr, self.option_labels)
                 for p, x, y, pr in zip(prompts, a, b, principles, strict=True)]
        return [soft_label(la, lb) for la, lb in self.option_logprobs(texts).tolist()]

    def critiques(self, prompts, responses, principles):
        return self.complete([critique_prompt(p, r, pr)
                              for p, r, pr in zip(prompts, responses, principles, strict=True)])

    def revisions(self, prompts, responses, critiques, principles):
        return self.complete([revision_prompt(p, r, c, pr)
                              for p, r, c, pr in zip(prompts, responses, critiques, principles, strict=True)])

    def comparisons(self, prompts, a, b, principles):
        first = self.prefer_first(prompts, a, b, principles)
        if not self.swap_average:
            return first
        swapped = self.prefer_first(prompts, b, a, principles)
        return [(p + 1.0 - q) / 2.0 for p, q in zip(first, swapped)]

    def critique(self, prompt, response, principle):
        return self.critiques([prompt], [response], [principle])[0]

    def revise(self, prompt, response, critique, principle):
        return self.revisions([prompt], [response], [critique], [principle])[0]

    def compare(self, prompt, a, b, principle):
        return self.comparisons([prompt], [a], [b], [principle])[0]


# ------------------------------------------------------------------------------------------ rule feedback

RuleName = Literal["positive", "on_topic", "no_repetition", "concise"]


#: The task whose words (:meth:`alignkit.Task.lexicon`) :class:`RuleFeedback` judges by when it is given neither
#: words nor a task that has words: the built-in ``sentiment`` task, named by class path and used through the
#: Task API only.
DEFAULT_TASK = "alignkit_plugins.tasks.SentimentTask"


def default_lexicon() -> Lexicon:
    """The words of :data:`DEFAULT_TASK` (an instance with its default settings)."""
    module, name = DEFAULT_TASK.rsplit(".", 1)
    lexicon = getattr(importlib.import_module(module), name)().lexicon()
    assert lexicon is not None, f"{DEFAULT_TASK} has no lexicon"
    return lexicon


@dataclass(frozen=True)
class Finding:
    """What a rule found in one response: ``score`` 0 means the principle is followed; each violation
    costs 1 (per negative word, missing item, extra repeat, word over the limit)."""

    score: float
    critique: str


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def topic_of(prompt: str, topics: tuple[str, ...]) -> str | None:
    """The first word of ``prompt`` that is a topic word (case-insensitive), or None."""
    return next((w for w in prompt.lower().split() if w in topics), None)


def negatives_in(words: list[str], negative: tuple[str, ...]) -> list[str]:
    """The distinct negative words of ``words`` (lower-cased), in order of appearance."""
    return list(dict.fromkeys(w.lower() for w in words if w.lower() in negative))


def repeats_in(words: list[str], ignored: frozenset[str]) -> dict[str, int]:
    """Each word (lower-cased, not ignored) used more than once, with its count, in order of appearance."""
    counts = Counter(w.lower() for w in words)
    return {w: counts[w] for w in dict.fromkeys(w.lower() for w in words) if counts[w] > 1 and w not in ignored}


def check_positive(prompt: str, response: str, lex: Lexicon) -> Finding:
    """Violations: each distinct negative word, and praising nothing (no positive word)."""
    words = response.split()
    negatives = negatives_in(words, lex.negative)
    praise = list(dict.fromkeys(w.lower() for w in words if w.lower() in lex.positive))
    problems = []
    if negatives:
        problems.append(f"uses negative words ({_and(negatives)})")
    if not praise:
        problems.append("praises nothing: it has no positive word")
    if problems:
        return Finding(-float(len(negatives) + (0 if praise else 1)), f"The review {' and '.join(problems)}.")
    return Finding(0.0, f"The review is positive: it praises with {_and(praise)} and has no negative word.")


def check_on_topic(prompt: str, response: str, lex: Lexicon) -> Finding:
    """Violation: the prompt's topic word is missing from the response."""
    topic = topic_of(prompt, lex.topics)
    if topic is None:
        return Finding(0.0, "The prompt names no item, so there is no topic to stay on.")
    words = [w.lower() for w in response.split()]
    if topic in words:
        return Finding(0.0, f"The review mentions the {topic}.")
    other = next((w for w in words if w in lex.topics), None)
    if other is not None:
        return Finding(-1.0, f"The review talks about the {other} instead of the {topic}.")
    return Finding(-1.0, f"The review never mentions the {topic}.")


def check_no_repetition(prompt: str, response: str, lex: Lexicon) -> Finding:
    """Violations: every extra use of a repeated word."""
    repeats = repeats_in(response.split(), lex.ignored)
    if not repeats:
        return Finding(0.0, "No word is repeated needlessly.")
    listed = _and([f"{w} ({n} times)" for w, n in repeats.items()])
    return Finding(-float(sum(n - 1 for n in repeats.values())), f"The response repeats {listed}.")


def check_concise(prompt: str, response: str, lex: Lexicon) -> Finding:
    """Violations: every word beyond ``max_words`` (none when the lexicon sets no limit)."""
    n = len(response.split())
    if lex.max_words is None:
        return Finding(0.0, f"The response has {n} words; there is no limit.")
    if n <= lex.max_words:
        return Finding(0.0, f"The response has {n} words, within the limit of {lex.max_words}.")
    return Finding(-float(n - lex.max_words),
                   f"The response has {n} words, {n - lex.max_words} more than the limit of {lex.max_words}.")


def fix_positive(prompt: str, response: str, lex: Lexicon) -> str:
    """Swap each negative word for the next positive word the response does not use yet (in the
    lexicon's order), then, if it still praises nothing, append ``and it was <positive word>``."""
    words = response.split()
    unused = [w for w in lex.positive if w not in {x.lower() for x in words}] or list(lex.positive)
    out = []
    for word in words:
        if word.lower() in lex.negative:
            word = unused.pop(0) if len(unused) > 1 else unused[0]
        out.append(word)
    if not any(w.lower() in lex.positive for w in out):
        out += ["and", "it", "was", unused[0]]
    return " ".join(out)


def fix_on_topic(prompt: str, response: str, lex: Lexicon) -> str:
    """When the prompt's item is missing, put it in place of the first other item the response names, or
    else prefix ``i had the <item> and``."""
    topic = topic_of(prompt, lex.topics)
    words = response.split()
    if topic is None or topic in (w.lower() for w in words):
        return " ".join(words)
    for i, word in enumerate(words):
        if word.lower() in lex.topics:
            return " ".join([*words[:i], topic, *words[i + 1:]])
    return " ".join(["i", "had", "the", topic, "and", *words])


def _trim_trailing(words: list[str], ignored: frozenset[str]) -> list[str]:
    """``words`` without the ignored words at its end (the first word always stays)."""
    while len(words) > 1 and words[-1].lower() in ignored:
        words = words[:-1]
    return words


def fix_no_repetition(prompt: str, response: str, lex: Lexicon) -> str:
    """Drop every later use of a repeated (not ignored) word, keeping its first use, together with the
    ignored words right before it (``bland and cold and cold`` -> ``bland and cold``)."""
    seen: set[str] = set()
    out: list[str] = []
    for word in response.split():
        key = word.lower()
        if key in seen and key not in lex.ignored:
            out = _trim_trailing(out, lex.ignored)
            continue
        seen.add(key)
        out.append(word)
    return " ".join(out)


def fix_concise(prompt: str, response: str, lex: Lexicon) -> str:
    """Keep the first ``max_words`` words, without ignored words left dangling at the end."""
    words = response.split()
    if lex.max_words is None or len(words) <= lex.max_words:
        return " ".join(words)
    return " ".join(_trim_trailing(words[:lex.max_words], lex.ignored))


Rule = tuple[Callable[[str, str, Lexicon], Finding], Callable[[str, str, Lexicon], str]]
RULES: dict[str, Rule] = {
    "positive": (check_positive, fix_positive),
    "on_topic": (check_on_topic, fix_on_topic),
    "no_repetition": (check_no_repetition, fix_no_repetition),
    "concise": (check_concise, fix_concise),
}


class RuleFeedback(Feedback):
    """A programmatic stand-in for an LM judge on the built-in tasks (their tiny models cannot follow a
    critique request). It never reads the principle's texts: each principle is checked by the rule of
    the same name (or the one ``rules`` maps it to):

    - ``positive``: no negative word, and at least one positive word;
    - ``on_topic``: the prompt's item (its first topic word) appears in the response (the fix puts it in
      place of another item the response names, or prefixes ``i had the <item> and``);
    - ``no_repetition``: no word outside the ignored (function) words is used twice;
    - ``concise``: at most ``max_words`` words.

    Each violation costs one point of the rule's score (0 = compliant). ``critique`` reports what the
    rule found, ``revise`` applies the rule's deterministic fix (the critique text is not needed),
    ``compare`` is the soft label ``σ((score_a − score_b) / temperature)`` (0.5 on a tie; temperature 0
    gives hard 0 / 1 labels), and ``complies`` is ``score == 0``.

    The words are the task's (:meth:`alignkit.Task.lexicon`): of ``task`` when given, else of the task of the
    command that uses the judge (``cai-revise``, ``cai-feedback``, ``cai-compliance``), else (and for a task
    without words) of :data:`DEFAULT_TASK`, the ``sentiment`` task; words given here replace the task's.

    Args:
        temperature: temperature of the soft label on the score difference.
        rules: principle name -> rule name, for principles not named after their rule.
        positive_words: words that praise (default: the task's).
        negative_words: words that disparage (default: the task's).
        ignored_words: words whose repetition is fine (default: the task's, e.g. function words).
        topic_words: words a prompt's topic can be (default: the task's, e.g. the reviewed items).
        max_words: longest concise response, in words (default: the task's).
        task: the task whose words are used (default: the command's task).
    """

    def __init__(self, temperature: float = 0.5, rules: dict[str, RuleName] | None = None,
                 positive_words: list[str] | None = None, negative_words: list[str] | None = None,
                 ignored_words: list[str] | None = None, topic_words: list[str] | None = None,
                 max_words: int | None = None, task: Task | None = None) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_words is not None and max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        unknown = sorted(set((rules or {}).values()) - set(RULES))
        if unknown:
            raise ValueError(f"unknown rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
        if positive_words is not None and not positive_words:
            raise ValueError("positive_words must not be empty (the positive rule's fix needs one)")
        self.temperature, self.rules = temperature, dict(rules or {})
        given = {"positive": None if positive_words is None else tuple(w.lower() for w in positive_words),
                 "negative": None if negative_words is None else tuple(w.lower() for w in negative_words),
                 "ignored": None if ignored_words is None else frozenset(w.lower() for w in ignored_words),
                 "topics": None if topic_words is None else tuple(w.lower() for w in topic_words),
                 "max_words": max_words}
        self._given = {key: value for key, value in given.items() if value is not None}
        self._task, self._task_given = task, task is not None
        self._lexicon: Lexicon | None = None

    def use_task(self, task: Task) -> None:
        """Judge by ``task``'s words from now on, unless a task was given to the constructor."""
        if not self._task_given:
            self._task, self._lexicon = task, None

    @property
    def lexicon(self) -> Lexicon:
        """The words the rules use: those given to the constructor, the rest from the task (see the class)."""
        if self._lexicon is None:
            found = self._task.lexicon() if self._task is not None else None
            lexicon = replace(found if found is not None else default_lexicon(), **self._given)
            if not lexicon.positive:
                raise ValueError(f"RuleFeedback has no positive words (the positive rule's fix needs one): task "
                                 f"{getattr(self._task, 'name', '?')!r} gives none; give positive_words")
            self._lexicon = lexicon
        return self._lexicon

    def rule(self, principle: Principle) -> Rule:
        """The (check, fix) pair for ``principle``."""
        name = self.rules.get(principle.name, principle.name)
        if name not in RULES:
            raise ValueError(f"RuleFeedback has no rule for principle {principle.name!r}; its rules are "
                             f"{', '.join(RULES)} (map the principle to one with rules={{{principle.name}: ...}})")
        return RULES[name]

    def check(self, prompt: str, response: str, principle: Principle) -> Finding:
        """The rule's finding on ``response``."""
        return self.rule(principle)[0](prompt, response, self.lexicon)

    def critique(self, prompt, response, principle):
        return self.check(prompt, response, principle).critique

    def revise(self, prompt, response, critique, principle):
        return self.rule(principle)[1](prompt, response, self.lexicon)

    def compare(self, prompt, a, b, principle):
        score_a = self.check(prompt, a, principle).score
        score_b = self.check(prompt, b, principle).score
        return bradley_terry(score_a, score_b, self.temperature)

    def complies(self, prompt, response, principle):
        return self.check(prompt, response, principle).score == 0
