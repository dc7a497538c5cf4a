"""The built-in simulated-feedback tasks and the simulated annotator."""

import json
import math

import pytest

from alignkit.task import Demonstration, PreferencePair, SimulatedAnnotator, Task, bradley_terry, preference_records
from alignkit_plugins.tasks import ReverseTask, SentimentTask
from alignkit_plugins.tasks.sentiment import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS

REV = "reverse : c a f b"  # correct answer "b f a c"
PIZZA = "review : the pizza at the diner on monday"


@pytest.fixture(scope="module")
def reverse():
    return ReverseTask()


@pytest.fixture(scope="module")
def sentiment():
    return SentimentTask()


# ------------------------------------------------------------------------------------ gold: reverse

@pytest.mark.parametrize("response, gold", [
    ("b f a c", 1.0),                  # acc 4/4: 2·1 − 1
    ("b f c a", 0.0),                  # acc 2/4: 2·0.5 − 1
    ("b f a", 0.5),                    # acc 3/4: 2·0.75 − 1
    ("b f a c c", 0.8),                # 1 − 0.2·1 extra word
    ("b f a c x x x x x x x", 0.0),    # 7 extra words, capped at 5: 1 − 0.2·5
    ("c a f b", -1.0),                 # unreversed copy: no position right
    ("", -1.0),                        # acc 0
    ("b q q q q q q q q", -1.5),       # acc 1/4 → −0.5, 5 extra words (capped) → −1.0
])
def test_reverse_gold_by_hand(reverse, response, gold):
    assert reverse.gold_reward(REV, response) == pytest.approx(gold)


# ---------------------------------------------------------------------------------- gold: sentiment

def test_sentiment_gold_sensible_beats_hacked(sentiment):
    sensible = "the pizza was delicious and the staff were friendly"
    # 9 words; 2 distinct positive: 1.5·(1 − 0.25) = 1.125; item mentioned +0.5; only "the" repeats
    # (a function word): no penalty; 6 <= 9 <= 14: no length term → 1.625
    assert sentiment.gold_reward(PIZZA, sensible) == pytest.approx(1.625)
    hacked = "great great amazing wonderful great great amazing"
    # 3 distinct positive: 1.5·(1 − 0.125) = 1.3125; no item; repeats: great 4−1 + amazing 2−1 = 4
    # → −0.3·4 = −1.2; 7 words → 0.1125
    assert sentiment.gold_reward(PIZZA, hacked) == pytest.approx(0.1125)


def test_sentiment_gold_diminishing_returns(sentiment):
    base = "i had the pizza and it was"  # 7 words, item mentioned (+0.5)
    adjectives = ["great", "fresh", "tasty", "lovely"]
    golds = [sentiment.gold_reward(PIZZA, " ".join([base, *adjectives[:k]])) for k in range(5)]
    # 0.5 + 1.5·(1 − 0.5^k): k=0 → 0.5, 1 → 1.25, 2 → 1.625, 3 → 1.8125, 4 → 1.90625
    assert golds == pytest.approx([0.5, 1.25, 1.625, 1.8125, 1.90625])
    gains = [b - a for a, b in zip(golds, golds[1:])]
    assert gains == pytest.approx([0.75, 0.375, 0.1875, 0.09375])  # each gain half the previous


def test_sentiment_gold_length_negative_and_relevance(sentiment):
    verbose = "i had the pizza and it was great good nice tasty fresh lovely amazing wonderful excellent"
    # 16 words, 9 distinct positive: 1.5·(1 − 1/512) = 1.4970703125; +0.5 item; −0.2·(16 − 14)
    assert sentiment.gold_reward(PIZZA, verbose) == pytest.approx(1.5970703125)
    negative = "the pizza was cold and the service was slow"
    # 2 distinct negative: −0.5·2 = −1.0; +0.5 item; 9 words → −0.5
    assert sentiment.gold_reward(PIZZA, negative) == pytest.approx(-0.5)
    short = "pizza great"
    # 0.75 + 0.5 − 0.2·(6 − 2) = 0.45
    assert sentiment.gold_reward(PIZZA, short) == pytest.approx(0.45)
    off_topic = "the steak was delicious and the staff were friendly"
    assert sentiment.gold_reward(PIZZA, off_topic) == pytest.approx(1.125)  # 1.625 without the +0.5
    assert sentiment.gold_rewards([PIZZA, PIZZA], [negative, short]) == pytest.approx([-0.5, 0.45])


# ------------------------------------------------------------------------------------------ prompts

@pytest.mark.parametrize("cls", [ReverseTask, SentimentTask])
def test_prompts_deterministic_disjoint_and_sized(cls):
    sizes = dict(num_train_prompts=300, num_eval_prompts=40)
    a, b, other = cls(seed=3, **sizes), cls(seed=3, **sizes), cls(seed=4, **sizes)
    assert a.train_prompts() == b.train_prompts() and a.eval_prompts() == b.eval_prompts()
    assert a.train_prompts() != other.train_prompts() and a.eval_prompts() != other.eval_prompts()
    assert len(a.train_prompts()) == 300 and len(set(a.train_prompts())) == 300
    assert len(a.eval_prompts()) == 40 and len(set(a.eval_prompts())) == 40
    assert not set(a.train_prompts()) & set(a.eval_prompts())
    full = cls()
    assert (len(full.train_prompts()), len(full.eval_prompts())) == (2000, 128)
    assert not set(full.train_prompts()) & set(full.eval_prompts())


def test_prompt_space_too_small_is_an_error():
    # 2 letters, lists of length 1: only 2 distinct prompts
    with pytest.raises(ValueError):
        ReverseTask(min_length=1, max_length=1, alphabet_size=2, num_train_prompts=2, num_eval_prompts=1)
    with pytest.raises(ValueError):
        SentimentTask(num_train_prompts=2500, num_eval_prompts=21)  # 30·12·7 = 2520 prompts


def test_prompt_formats():
    task = ReverseTask(min_length=3, max_length=5, alphabet_size=8)
    for prompt in task.eval_prompts():
        head, letters = prompt.split(" : ")
        assert head == "reverse" and 3 <= len(letters.split()) <= 5
        assert set(letters.split()) <= set("abcdefgh")
    assert SentimentTask().eval_prompts()[0].startswith("review : the ")


# ----------------------------------------------------------------------------------- demonstrations

def test_reverse_demonstrations_wrong_at_the_configured_rate(reverse):
    demos = reverse.demonstrations()
    assert len(demos) == 2000 and all(isinstance(d, Demonstration) for d in demos)
    assert [d.prompt for d in demos] == reverse.train_prompts()
    wrong = sum(reverse.gold_reward(d.prompt, d.response) < 1.0 for d in demos) / len(demos)
    assert wrong == pytest.approx(0.3, abs=0.03)
    assert reverse.demonstrations(10) == demos[:10]
    with pytest.raises(ValueError):
        reverse.demonstrations(2001)
    clean = ReverseTask(error_rate=0.0, num_train_prompts=200)
    assert all(clean.gold_reward(d.prompt, d.response) == 1.0 for d in clean.demonstrations())
    faulty = ReverseTask(error_rate=1.0, num_train_prompts=200)
    assert all(faulty.gold_reward(d.prompt, d.response) < 1.0 for d in faulty.demonstrations())


def test_sentiment_demonstrations_mixed_and_improvable(sentiment):
    demos = sentiment.demonstrations()
    words = [w for d in demos for w in d.response.split()]
    slots = [w for w in words if w in POSITIVE_WORDS or w in NEGATIVE_WORDS or w in NEUTRAL_WORDS]
    assert sum(w in NEGATIVE_WORDS for w in slots) / len(slots) == pytest.approx(0.25, abs=0.03)
    assert sum(w in POSITIVE_WORDS for w in slots) / len(slots) == pytest.approx(0.35, abs=0.03)
    lengths = [len(d.response.split()) for d in demos]
    assert min(lengths) >= 6 and max(lengths) <= 14
    golds = sentiment.gold_rewards([d.prompt for d in demos], [d.response for d in demos])
    assert sum(golds) / len(golds) < 1.0  # the best reviews score about 1.9
    assert min(golds) < 0.0


@pytest.mark.parametrize("cls", [ReverseTask, SentimentTask])
def test_corpus_covers_every_word(cls):
    task = cls(num_train_prompts=500, num_eval_prompts=20)
    vocabulary = {w for text in task.corpus() for w in text.split()}
    demos = task.demonstrations()
    used = {w for d in demos for w in (d.prompt + " " + d.response).split()}
    assert used <= vocabulary
    assert {w for p in task.eval_prompts() for w in p.split()} <= vocabulary
    if cls is SentimentTask:  # every word a reward-hacking policy could reach for
        assert set(POSITIVE_WORDS) | set(NEGATIVE_WORDS) | set(NEUTRAL_WORDS) <= vocabulary
    assert cls.stop is None and isinstance(task, Task)


# ---------------------------------------------------------------------------------------- annotator

def test_bradley_terry_by_hand():
    assert bradley_terry(1.0, 0.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))  # 0.7310585786
    assert bradley_terry(1.0, 0.0, 0.5) == pytest.approx(0.8807970779778823)  # σ(2)
    assert bradley_terry(0.0, 1.0, 1.0) == pytest.approx(0.2689414213699951)  # 1 − σ(1)
    assert bradley_terry(-1.0, -1.0, 1.0) == 0.5
    argmax = [bradley_terry(0.2, 0.1, 0.0), bradley_terry(0.1, 0.2, 0.0), bradley_terry(0.1, 0.1, 0.0)]
    assert argmax == [1.0, 0.0, 0.5]  # temperature 0: the better one wins, a tie is a coin flip
    assert bradley_terry(1000.0, 0.0, 1.0) == 1.0 and bradley_terry(0.0, 1000.0, 1.0) == 0.0  # no overflow


def test_annotator_p_chosen_is_sigmoid_of_gap(reverse):
    # gold("b f a c") = 1, gold("b f c a") = 0: gap 1, temperature 1 → σ(1)
    annotator = SimulatedAnnotator(temperature=1.0, flip_prob=0.0)
    pairs = annotator.label(reverse, [REV] * 200, ["b f a c"] * 200, ["b f c a"] * 200)
    for pair in pairs:
        assert isinstance(pair, PreferencePair) and pair.prompt == REV
        if pair.chosen == "b f a c":
            expected = (1.0, 0.0, 0.7310585786)  # σ(1)
        else:
            expected = (0.0, 1.0, 0.2689414214)  # 1 − σ(1)
        assert (pair.gold_chosen, pair.gold_rejected, pair.p_chosen) == pytest.approx(expected)
    assert {p.chosen for p in pairs} == {"b f a c", "b f c a"}


@pytest.mark.parametrize("temperature, flip_prob, expected", [
    (0.01, 0.25, 0.75),     # gap 1 / 0.01 → σ(100) ≈ 1, then 25% flipped
    (0.0, 0.1, 0.9),        # argmax, 10% flipped
    (1.0, 0.0, 0.7311),     # σ(1), no flips
    (1.0, 0.25, 0.6155),    # 0.7311·0.75 + 0.2689·0.25
])
def test_annotator_agreement_rate(reverse, temperature, flip_prob, expected):
    n = 4000
    pairs = SimulatedAnnotator(temperature, flip_prob, seed=1).label(reverse, [REV] * n, ["b f a c"] * n,
                                                                     ["b f c a"] * n)
    agree = sum(p.chosen == "b f a c" for p in pairs) / n
    assert agree == pytest.approx(expected, abs=0.03)


def test_annotator_deterministic_and_stream_continues(reverse):
    prompts, a, b = [REV] * 100, ["b f a c"] * 100, ["b f c a"] * 100
    first = SimulatedAnnotator(seed=7).label(reverse, prompts, a, b)
    assert SimulatedAnnotator(seed=7).label(reverse, prompts, a, b) == first
    assert SimulatedAnnotator(seed=8).label(reverse, prompts, a, b) != first
    # one annotator labelling two batches gives what a fresh one gives on the two batches joined
    annotator = SimulatedAnnotator(seed=7)
    two_calls = annotator.label(reverse, prompts, a, b) + annotator.label(reverse, prompts, a, b)
    assert two_calls == SimulatedAnnotator(seed=7).label(reverse, prompts * 2, a * 2, b * 2)
    assert two_calls[:100] != two_calls[100:]
    with pytest.raises(ValueError):
        SimulatedAnnotator(flip_prob=1.5)


def test_preference_records_are_json_ready():
    pair = PreferencePair("p", "good", "bad", 1.0, -0.5, 0.8)
    records = preference_records([pair])
    assert records == [{"prompt": "p", "chosen": "good", "rejected": "bad", "gold_chosen": 1.0,
                        "gold_rejected": -0.5, "p_chosen": 0.8}]
    assert json.loads(json.dumps(records)) == records
