"""From files to findings, no model: concentration and agreement tables, statistics, lineage, the results
tables and figures, faithfulness and degeneration reports. Imports: `arca.credit`, `arca.tasks`, `arca.methods`,
`arca.io`; no TRL."""
