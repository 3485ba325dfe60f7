"""ARCA: Adapter-Residual Credit Assignment for LoRA-GRPO, as a drop-in for TRL's `GRPOTrainer`.

```python
from arca import CreditGRPOConfig, CreditGRPOTrainer

args = CreditGRPOConfig(output_dir="out", credit_method="arca")  # every GRPOConfig field, plus credit_*
trainer = CreditGRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=..., peft_config=LoraConfig(...))
```

The names below are imported on first use, so `import arca.signals` (or `arca.credit`) does not load TRL's
trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {
    "CreditGRPOTrainer": "arca.trainer",
    "CreditGRPOConfig": "arca.config",
    "CreditConfig": "arca.credit_config",
    "METHODS": "arca.credit_config",
    "compute_signals": "arca.signals",
    "normalize": "arca.credit",
    "gini": "arca.diagnostics",
    "effective_token_ratio": "arca.diagnostics",
    "accuracy_reward": "arca.grading",
    "faithfulness_scores": "arca.analysis.faithfulness",
    "scaled_adapter": "arca.sampling.scaling",
}
__all__ = [
    "METHODS",
    "CreditConfig",
    "CreditGRPOConfig",
    "CreditGRPOTrainer",
    "accuracy_reward",
    "compute_signals",
    "effective_token_ratio",
    "faithfulness_scores",
    "gini",
    "normalize",
    "scaled_adapter",
]

if TYPE_CHECKING:
    from arca.analysis.faithfulness import faithfulness_scores
    from arca.config import CreditGRPOConfig
    from arca.credit import normalize
    from arca.credit_config import METHODS, CreditConfig
    from arca.diagnostics import effective_token_ratio, gini
    from arca.grading import accuracy_reward
    from arca.sampling.scaling import scaled_adapter
    from arca.signals import compute_signals
    from arca.trainer import CreditGRPOTrainer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'arca' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
