"""Per-token credit, tensors in and tensors out: the signals, the vocabulary sweep, `arca_local`, normalization,
precision and the concentration diagnostics. Imports: `arca.methods` and `arca.io` only; torch, no TRL."""
