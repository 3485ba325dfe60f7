"""Model-side loops over rollouts: probe and evaluation sampling (HF or vLLM), per-token dumps, merged and scaled
adapters, counterfactual decodes and the degeneration sweep. Imports: `arca.credit`, `arca.tasks`, `arca.models`,
`arca.methods`, `arca.io`; no TRL."""
