"""The test configuration's warning filters (``[tool.pytest.ini_options] filterwarnings`` in pyproject.toml):
a DeprecationWarning raised from alignkit's own code (``alignkit``, ``alignkit_plugins``) fails the test, while
third-party deprecations stay ignored."""

from __future__ import annotations

import warnings

import pytest


def deprecated_function_in(module: str):
    """A function whose ``warnings.warn(..., DeprecationWarning)`` is attributed to ``module`` (warnings take the
    module name from the ``__name__`` of the frame that warns)."""
    namespace = {"__name__": module, "warnings": warnings}
    exec(compile("def deprecated():\n    warnings.warn('deprecated', DeprecationWarning)\n", f"<{module}>", "exec"),
         namespace)
    return namespace["deprecated"]


@pytest.mark.parametrize("module", ["alignkit", "alignkit.cli", "alignkit_plugins.dpo"])
def test_own_deprecation_warnings_are_errors(module):
    with pytest.raises(DeprecationWarning, match="deprecated"):
        deprecated_function_in(module)()


@pytest.mark.parametrize("module", ["torch.nn.modules.module", "transformers.utils", "lightning.pytorch"])
def test_third_party_deprecation_warnings_stay_ignored(module):
    deprecated_function_in(module)()  # no error
