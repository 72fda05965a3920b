"""veRL 0.9.1 adapter: TSPO advantage estimators and a reward function for veRL's trainer.

Importing this package registers the estimators ``tspo``, ``tspo_switch``, ``folr_scalar`` and
``tspo_grpo`` with ``verl.trainer.ppo.core_algos``. veRL computes advantages inside a Ray actor,
so a run must import it there too: pass
``+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=tspo.integrations.verl.register_estimators``
(see ``docs/scaling-with-verl.md``). The maths lives in :mod:`tspo.algo`; this package only
translates veRL's tensors (:mod:`tspo.integrations.verl.encoding`).
"""

from tspo.integrations.verl.encoding import (
    HIT_STRIDE,
    decode_batch,
    decode_scores,
    encode_score,
    turn_ids_from_response_mask,
)
from tspo.integrations.verl.estimators import VERL_ESTIMATORS, register_estimators

register_estimators()

__all__ = [
    "HIT_STRIDE",
    "VERL_ESTIMATORS",
    "decode_batch",
    "decode_scores",
    "encode_score",
    "register_estimators",
    "turn_ids_from_response_mask",
]
