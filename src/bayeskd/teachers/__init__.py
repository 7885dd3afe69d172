"""Teachers reached as black boxes, through text and top-k logprobs only.

`base` is the interface (requests, responses, errors), `build` picks the client a config names:
`local` (a Hugging Face model in this process, with `decoding`'s continuous batching) or
`openai_compat` (any OpenAI-compatible endpoint). `cached` puts a teacher behind the response
`store` and a budget, `batch` does the same through a Batch API; `check` is `bayeskd
teacher-check`; `server` is `bayeskd serve` (its Batch API in `serve_batch`), with the `faults`
and `quirks` that tests turn on, run by `hosting` (foreground, a thread, a child process). `config` holds their options.

May import: the run's plumbing (bayeskd.errors, config, artifacts, models). Nothing here imports
the estimate, training, evaluation or the stages.
"""
