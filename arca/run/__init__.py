"""One training run from its settings to its files: settings, resume, snapshots, budget and summary. Imports:
`arca.grpo`, `arca.credit`, `arca.sampling`, `arca.tasks`, `arca.models`, `arca.methods`, `arca.io`; no TRL."""
