"""Problems, prompts and graders: MATH sources, the seeded arithmetic and reasoning sources, prompt formats,
`\\boxed{}` grading and the reward functions. Imports: `arca.methods` and `arca.io` only; no torch."""
