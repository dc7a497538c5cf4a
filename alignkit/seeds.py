"""One seed drives a run: every internal seed left unset (``None``) is derived from the run's seed by a
named, stable derivation, so two seeds of a recipe or pipeline differ in *every* source of randomness and
one seed gives the same numbers every time.

The run's seed is ``seed_everything`` in ``alignkit fit`` (Lightning seeds the global ``random``, numpy and
torch streams with it) or ``seed`` in ``alignkit pipeline`` (every ``fit`` stage gets it as its
``seed_everything``, every other stage with a ``seed`` option gets ``derive_seed(seed, <stage name>)``).
``AlignCLI`` fills each ``seed`` key of the parsed config that is ``None`` with
``derive_seed(seed_everything, role)``, where the role is the key's dotted config path without ``init_args``,
so the run's ``config.yaml`` records every derived seed. An object built in Python (no CLI) with seed ``None``
derives it from the global seed Lightning's ``seed_everything`` set (the ``PL_GLOBAL_SEED`` environment
variable, 0 when unset) with the same role, so Python and CLI runs agree. A seed given explicitly is kept.

===========================  ==================================================================================
role                         what it seeds
===========================  ==================================================================================
``seed_everything``          (the run's seed itself) the global streams: PPO/online sampling, a reward model's
                             score head loaded ``from_pretrained``, dropout
``model.policy.tiny.seed``   initial weights of the built-in tiny model (and of a tiny reward model's head);
                             its tokenizer never depends on it
``data.seed``                the data module: train/validation split, bootstrap resample, epoch order
``model.algorithm.seed``     the algorithm's own stream, e.g. PPO's minibatch order
``annotator``                ``alignkit collect``'s simulated annotator (label noise), from collect's ``seed``
                             (which seeds the pair sampling)
``feedback``                 Constitutional AI's ``LMFeedback`` sampling, from its command's ``seed``
<stage name>                 ``alignkit pipeline``: the ``--seed`` of a non-fit command stage (``collect`` ...)
===========================  ==================================================================================

Any other ``seed`` key set to ``None`` (a plugin's option) gets its own role, its dotted path. Fixed on
purpose, whatever the run's seed (the yardstick every seed is measured with): a task's ``seed`` (its
prompt split and demonstrations) and ``alignkit eval``'s sampling seed.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from jsonargparse import Namespace

#: The largest derived seed: Lightning's ``seed_everything`` and ``torch.manual_seed`` take any of them.
MAX_SEED = 2**31 - 1

F = TypeVar("F", bound=Callable[..., Any])

MODEL_INIT = "model.policy.tiny.seed"
DATA = "data.seed"
ALGORITHM = "model.algorithm.seed"
ANNOTATOR = "annotator"
FEEDBACK = "feedback"


def derive_seed(seed: int, name: str) -> int:
    """The seed of role ``name`` in a run seeded with ``seed``, in ``[0, 2**31 - 1]``.

    ``SeedSequence([seed, crc32(name)])``: stable across processes and Python versions (``hash`` of a string
    is randomised per process), and the streams of two roles or two seeds are unrelated.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"a run's seed must be a non-negative integer, got {seed!r}")
    state = np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))]).generate_state(1)[0]
    return int(state) & MAX_SEED


def global_seed() -> int:
    """The seed Lightning's ``seed_everything`` set in this process (``PL_GLOBAL_SEED``), 0 when none was."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def resolve_seed(seed: int | None, role: str) -> int:
    """``seed`` when given, else ``derive_seed(global_seed(), role)``: how an object built without the CLI
    reads a seed left to be derived."""
    return seed if seed is not None else derive_seed(global_seed(), role)


def fill_seeds(config: Any, seed: int) -> dict[str, int]:
    """Replace every ``seed`` key whose value is ``None`` in a parsed config (jsonargparse ``Namespace``,
    dicts and lists inside it) by ``derive_seed(seed, role)``, the role being the key's dotted path without
    ``init_args`` (e.g. ``data.seed``, ``model.algorithm.seed``, ``model.rewards.0.seed``). Returns the filled
    seeds by role."""
    filled: dict[str, int] = {}
    _fill(config, seed, (), filled)
    return filled


def _fill(node: Any, seed: int, path: tuple[str, ...], filled: dict[str, int]) -> None:
    if isinstance(node, list):
        for index, item in enumerate(node):
            _fill(item, seed, (*path, str(index)), filled)
        return
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, Namespace):
        items = list(vars(node).items())
    else:
        return
    for key, value in items:
        if not isinstance(key, str) or key.startswith("__"):
            continue
        here = path if key == "init_args" else (*path, key)
        if key == "seed" and value is None:
            role = ".".join(here)
            filled[role] = derive_seed(seed, role)
            if isinstance(node, dict):
                node[key] = filled[role]
            else:
                setattr(node, key, filled[role])
        else:
            _fill(value, seed, here, filled)


def fixed_seed(function: F) -> F:
    """Mark a command whose ``seed`` is a yardstick (the same whatever the run's seed, e.g. the sampling seed of
    an evaluation): ``alignkit pipeline --seed`` then leaves that stage's ``--seed`` as the stage gives it.
    Sets ``function.fixed_seed = True``, the attribute the pipeline reads."""
    setattr(function, "fixed_seed", True)
    return function
