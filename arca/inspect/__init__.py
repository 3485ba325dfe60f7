"""`arca inspect`: the per-token credit diagnostics of the pipeline on any PEFT LoRA adapter, without the pipeline
(a dump, concentration and faithfulness tables and the token explorer from a base, an adapter and a prompts file).
Imports: `arca.sampling`, `arca.analysis`, `arca.credit`, `arca.tasks`, `arca.models`, `arca.methods`, `arca.io`,
`arca.progress`; no TRL."""
