"""Options of the `eval` stage. Loaded by `bayeskd.config`; imports nothing of bayeskd but errors."""

from __future__ import annotations

from dataclasses import dataclass, field

from bayeskd.errors import check


@dataclass
class EvalConfig:
    """Stage `eval`: students and estimates on held-out prompts (method.md, section 5)."""

    max_examples: int = 64
    """Held-out examples to score (the first ones of the held-out split)."""
    max_new_tokens: int | None = None
    """Greedy generation length for ROUGE-L and exact match (default: collect.max_tokens)."""
    oracle: bool = True
    """Use the teacher as an oracle (KL to the teacher, fidelity) when it is a local open model."""
    oracle_model: str | None = None
    """The open model behind a served teacher (`teacher.backend: openai` pointing at `bayeskd serve`,
    vLLM, ...), loaded as the oracle by `eval` and `distill` mode `oracle-kd` only; the method's
    stages never read it. Null: the teacher itself when `teacher.backend` is `local`, else no oracle."""
    estimates: bool = True
    """Measure the estimates' fidelity (needs the oracle); false scores the students alone."""
    fidelity_positions: int = 1500
    """Most positions per setting (training, held-out) for the dense fidelity measures."""
    one_hot_eps: float = 0.1
    """Smoothing of the one-hot estimate: 1 - eps on the realised token."""
    control_lambdas: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    """Grid for the control lambda * one-hot + (1 - lambda) * proxy; the best is reported."""
    batch_size: int = 8

    def validate(self, path: str) -> None:
        check(self.max_examples >= 1, f"{path}.max_examples", self.max_examples, "must be >= 1")
        check(0 < self.one_hot_eps < 1, f"{path}.one_hot_eps", self.one_hot_eps, "must be in (0, 1)")
        check(all(0 <= x <= 1 for x in self.control_lambdas), f"{path}.control_lambdas", self.control_lambdas, "must be in [0, 1]")
        check(self.fidelity_positions >= 1, f"{path}.fidelity_positions", self.fidelity_positions, "must be >= 1")
        check(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, "must be >= 1")
