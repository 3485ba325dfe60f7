"""ARCA: Adapter-Residual Credit Assignment for LoRA-GRPO, as a drop-in for TRL's `GRPOTrainer`.

```python
from arca import CreditGRPOConfig, CreditGRPOTrainer

args = CreditGRPOConfig(output_dir="out", credit_method="arca")  # every GRPOConfig field, plus credit_*
trainer = CreditGRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=..., peft_config=LoraConfig(...))
```

The names below are imported on first use, so `import arca.credit.signals` (or `arca.methods`) does not load
TRL's trainer. The package is layered: `arca.methods` (the method table), `arca.choices` and `arca.io` at the
base, then `tasks`, `credit`, `models`, `sampling`, `grpo` (the only TRL glue), `run` and `analysis`; each
subpackage's docstring states what it may import, and tests/test_layers.py holds the rules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {
    "CreditGRPOTrainer": "arca.grpo.trainer",
    "CreditGRPOConfig": "arca.grpo.config",
    "CreditConfig": "arca.credit.config",
    "METHODS": "arca.methods",
    "compute_signals": "arca.credit.signals",
    "normalize": "arca.credit.normalize",
    "gini": "arca.credit.diagnostics",
    "effective_token_ratio": "arca.credit.diagnostics",
    "accuracy_reward": "arca.tasks.grading",
    "math_reward": "arca.tasks.grading",
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
    "math_reward",
    "normalize",
    "scaled_adapter",
]

if TYPE_CHECKING:
    from arca.analysis.faithfulness import faithfulness_scores
    from arca.credit.config import CreditConfig
    from arca.credit.diagnostics import effective_token_ratio, gini
    from arca.credit.normalize import normalize
    from arca.credit.signals import compute_signals
    from arca.grpo.config import CreditGRPOConfig
    from arca.grpo.trainer import CreditGRPOTrainer
    from arca.methods import METHODS
    from arca.sampling.scaling import scaled_adapter
    from arca.tasks.grading import accuracy_reward, math_reward


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'arca' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
