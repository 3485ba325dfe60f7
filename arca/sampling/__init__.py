"""Model-side sampling: rollouts, dumps, counterfactual decodes."""
