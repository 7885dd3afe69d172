"""What we measure (docs/method.md, section 5): `metrics` (pure functions: bits per byte, KL,
ROUGE-L, fidelity), `answers` (exact-match scoring of short answers), `suite` (task families
with gold answers and their own splits), `nextbyte` (next-byte distributions, comparable across
tokenizers), `oracle` (the true teacher distribution, for the evaluator and oracle-kd only,
never the method) and `report` (the Markdown report with plots). `config` holds the `eval` options.

May import: the run's plumbing (bayeskd.errors, config, artifacts, data, corpus, models,
prompts), the `estimate` (targets and distributions it scores) and `teachers.decoding` (the
oracle's sampling distribution). Never training or the stages.
"""
