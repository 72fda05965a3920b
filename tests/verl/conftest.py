"""The veRL adapter tests run only where veRL 0.9.1 is installed (``.venv-verl``).

In the main environment veRL is absent and these modules are not even collected. With
``TSPO_REQUIRE_VERL=1`` (``make test-verl``, CI) a missing veRL is a hard error, never a skip.
"""

import importlib.util
import os

REQUIRE_VERL = os.environ.get("TSPO_REQUIRE_VERL") == "1"
# pytest puts tests/ on sys.path, where this very folder passes for a namespace package "verl"
# (origin None); only a real installation counts.
_verl_spec = importlib.util.find_spec("verl")

if _verl_spec is None or _verl_spec.origin is None:
    if REQUIRE_VERL:
        raise RuntimeError(
            "TSPO_REQUIRE_VERL=1 but veRL is not importable in this environment; "
            "create it with `bash scripts/setup_verl_env.sh .venv-verl`"
        )
    collect_ignore_glob = ["test_*.py"]
