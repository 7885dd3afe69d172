"""The estimate of the teacher's token distributions (docs/method.md, sections 1-2 and 5).

`ngram` (with its compiled `kernels`) counts the corpus into the prior; `distributions` is the
sparse top-K-plus-tail type and the Dirichlet updates; `evidence` maps the API's top-k token
strings onto the student's vocabulary; `update` combines prior, proxy and evidence into the
posterior; `blackbox` measures fidelity without an oracle and fits the posterior's
hyperparameters by it; `targets` is the memory-mapped store the students read. `config` holds
the `prior`, `posterior` and `probe` options.

May import: the run's plumbing (bayeskd.errors, config, artifacts, data, corpus, models). Never
the teachers (the estimate sees their answers only as corpus records), training, evaluation or
the stages.
"""
