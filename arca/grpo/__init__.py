"""The TRL glue: `CreditGRPOConfig`, `CreditGRPOTrainer` and the hooks, sampler and logs the trainer needs. The
only room that imports TRL. Imports: `arca.credit`, `arca.sampling`, `arca.tasks`, `arca.methods`, `arca.io`."""
