"""Training: the one loop every model goes through (`loop`, on accelerate, with checkpoints in
`checkpoints`), its losses (`losses`: sparse KL with a tail bucket, CE, DPO), `fit` (one
training call with validation and best-step selection, shared by the proxy and the students),
the proxy's preference pairs (`preference`) and the cross-tokenizer student (`student`).
`config` holds the `train`, `data`, `proxy` and `distill` options.

May import: the run's plumbing (bayeskd.errors, config, artifacts, data, corpus, models),
`estimate.distributions` (the targets' type), `evaluate.metrics` (the validation NLL), and
`teachers.decoding` and `teachers.base` (the proxy samples its own responses for DPO pairs, keyed
as the teacher's are). Never the stages.
"""
