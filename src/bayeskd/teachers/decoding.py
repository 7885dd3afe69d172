"""Continuous batching for a local causal LM: a slot KV cache, per-row sampling, one decode loop.

A *row* is one sample: a prompt, its sampling parameters and the tokens generated so far. Rows
live in the *slots* of a preallocated KV cache, and each decode step runs the model once over
every live row, each at its own position. A row finishes on its own (EOS, a stop string, its
`max_tokens`) and frees its slot; waiting rows take free slots after a batched prefill of their
prompts. So requests with different sampling parameters share forward passes, and a long
response never holds up short ones. The model is the Hugging Face model's own forward; only
the cache (`SlotCache`) and the loop are ours.

Slot layout. A prefill batch left-pads its prompts to its longest, P tokens: slot columns
[start, P) hold the prompt and column P + t holds generated token t. Columns before `start` are
masked out and positions (for RoPE) count from `start`, so every row computes exactly the
sequence it would compute alone. A request's n rows share one prefill of its prompt.

Sampling, per row: logits -> / temperature -> softmax -> top-p (keep the smallest set of the
most likely tokens whose mass reaches top_p) -> one draw by inverse CDF. With F the cumulative
mass over the kept tokens and u_t the row's t-th uniform, the token is the i with
F(i-1) <= u_t F(V) < F(i); zero-mass tokens have empty intervals and are never drawn.
Temperature 0 is greedy (argmax). The uniforms come from the row's own generator, so what a
row samples depends on its seed and the model, not on its batch-mates.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

CHUNK_ROWS = 256
"""Rows sampled at once: bounds the [rows, vocabulary] temporaries (a 3000-sample probe has 3000 rows)."""
MIN_SHARED = 8
"""Shortest common prompt head worth keeping (see `Decoder._shared_prefix`)."""
IDLE_COLUMNS = 512
"""An idle decoder drops a cache wider than this: one long request must not hold its memory for good."""
PREFILL_TOKENS = 8192
"""Prompt tokens (after padding) per prefill forward: bounds its activations."""


@dataclass(eq=False)
class Row:
    """One sample being generated. `prompt` is shared (the same list) by the rows of one request."""

    key: object
    prompt: list[int]
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    top_k: int = 0
    """Draw from the top_k likeliest tokens only (0: all): a server's own truncation, which the
    logprobs do not show (`serve.quirks: server_top_k`)."""
    uniforms: list[float] | None = None
    """One U[0, 1) draw per token from the row's own generator; None when greedy."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[int], list[float]]] = field(default_factory=list)
    """Per generated token when `top_logprobs`: (its logprob, top-k ids, top-k logprobs), raw distribution."""
    finish: str | None = None
    shared: int = 0
    """Cache columns [0, shared) hold the prompt's shared prefix (see `Decoder.prefix`)."""
    start: int = 0
    """Columns [shared, start) are padding; the rest of the prompt starts at `start`."""
    col: int = 0
    """Cache column that the last generated token will be written to."""


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values, [slots, kv_heads, capacity, head_dim], written at a column per row.

    Transformers' StaticLayer writes every row at one shared position; continuous batching needs
    each row at its own, so the owning SlotCache says where (`cols`) before each forward.
    """

    is_sliding = False

    def __init__(self, cache: SlotCache):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a SlotLayer is filled by SlotCache.store before it is used")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        c = self.cache
        rows = c.rows
        self.keys[rows, :, c.cols] = key_states[:, :, 0]
        self.values[rows, :, c.cols] = value_states[:, :, 0]
        return self.keys[: len(rows), :, : c.width], self.values[: len(rows), :, : c.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.width, 0

    def get_seq_length(self) -> int:
        return self.cache.width

    def get_max_length(self) -> int:
        return self.capacity

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


class SlotCache(Cache):
    """The decode cache: live rows in slots 0..n-1, each with its own write column."""

    def __init__(self, num_layers: int, slots: int):
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])
        self.slots = slots
        self.rows = torch.arange(0)
        self.cols = torch.zeros(0, dtype=torch.long)
        self.width = 0

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    def plan(self, cols: torch.Tensor, width: int) -> None:
        """Before a decode forward over slots 0..len(cols)-1: where each row writes, how many columns attention reads."""
        self.rows = torch.arange(len(cols), device=cols.device)
        self.cols, self.width = cols, width

    def reserve(self, capacity: int, like: torch.Tensor) -> None:
        """Make room for `capacity` columns (grown in steps of 64, contents kept); `like` gives heads, dim, dtype."""
        if capacity <= self.capacity:
            return
        capacity = -(-capacity // 64) * 64
        _, heads, _, dim = like.shape
        for layer in self.layers:
            new_k = like.new_zeros(self.slots, heads, capacity, dim)
            new_v = like.new_zeros(self.slots, heads, capacity, dim)
            if layer.keys is not None:
                new_k[:, :, : layer.capacity] = layer.keys
                new_v[:, :, : layer.capacity] = layer.values
            layer.keys, layer.values = new_k, new_v
            layer.is_initialized = True

    def store(self, slots: torch.Tensor, source: torch.Tensor, prefill: DynamicCache, valid: torch.Tensor) -> None:
        """Copy prefilled prompts into slots: slot slots[j] gets prefill row source[j]; padding is zeroed.

        valid: [len(slots), P] bool, False on left padding. Zeroing it keeps any non-finite value
        that the padded positions computed out of attention (0 x NaN would still be NaN).
        """
        keep = valid[:, None, :, None]
        for layer, done in zip(self.layers, prefill.layers):
            width = done.keys.shape[2]
            layer.keys[slots, :, :width] = done.keys[source].masked_fill(~keep, 0.0)
            layer.values[slots, :, :width] = done.values[source].masked_fill(~keep, 0.0)

    def move(self, src: list[int], dst: list[int], width: int) -> None:
        """Slot dst[j] takes the first `width` columns of slot src[j] (no slot is both)."""
        if not src:
            return
        device = self.layers[0].keys.device
        s, d = torch.tensor(src, device=device), torch.tensor(dst, device=device)
        for layer in self.layers:
            layer.keys[d, :, :width] = layer.keys[s, :, :width]
            layer.values[d, :, :width] = layer.values[s, :, :width]


def sample(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """One token per row from logits [rows, V]: greedy, or temperature + top-p by inverse CDF (module docstring)."""
    out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if r.temperature == 0]
    drawn = [i for i, r in enumerate(rows) if r.temperature > 0]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        out[idx] = logits[idx].argmax(-1)
    if not drawn:
        return out
    idx = torch.tensor(drawn, device=logits.device)
    temps = torch.tensor([rows[i].temperature for i in drawn], device=logits.device, dtype=torch.float32)
    z = logits[idx].float() / temps[:, None]
    # Unnormalised exp(z - max): the draw scales u by the total mass, so softmax's division is not needed.
    weights = torch.exp(z - z.max(-1, keepdim=True).values)
    for j, i in enumerate(drawn):
        if 0 < rows[i].top_k < weights.shape[-1]:  # a server's top_k: the rest of the vocabulary is never drawn
            kth = weights[j].topk(rows[i].top_k).values[-1]
            weights[j] = weights[j].masked_fill(weights[j] < kth, 0.0)
    u = torch.tensor([rows[i].uniforms[len(rows[i].tokens)] for i in drawn], device=logits.device, dtype=torch.float32)
    top_p = torch.tensor([rows[i].top_p for i in drawn], device=logits.device, dtype=torch.float32)
    nucleus = top_p < 1
    picked = torch.empty(len(drawn), dtype=torch.long, device=logits.device)
    if not nucleus.all():
        picked[~nucleus] = _inverse_cdf(weights[~nucleus], u[~nucleus])
    if nucleus.any():
        sorted_w, order = weights[nucleus].sort(dim=-1, descending=True)
        mass = sorted_w.cumsum(-1)
        # keep the smallest set reaching top_p: drop a token when the mass before it already does
        drop = mass - sorted_w >= top_p[nucleus, None] * mass[:, -1:]
        j = _inverse_cdf(sorted_w.masked_fill(drop, 0.0), u[nucleus])
        picked[nucleus] = order.gather(1, j[:, None])[:, 0]
    out[idx] = picked
    return out


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution `sample` draws from, [..., V]: softmax(z / T) cut to its nucleus (the
    tokens, in decreasing probability, while the mass before them is below top_p), renormalised;
    T = 0: the argmax. What the oracle measures and the estimate targets (`distributions.Sampling`)."""
    z = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)
    p = torch.softmax(z / temperature, -1)
    if top_p >= 1:
        return p
    sorted_p, order = p.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p
    kept = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(p).scatter_(-1, order, kept)
    return out / out.sum(-1, keepdim=True)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with F(i-1) <= u F(V) < F(i) per row of non-negative weights [b, V], F their cumulative sum."""
    cdf = weights.cumsum(-1)
    j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    over = j >= weights.shape[-1]
    if over.any():  # u F(V) rounded up to F(V) itself (a 1e-7 event): take the likeliest token
        j[over] = weights[over].argmax(-1)
    return j


class Decoder:
    """Rows in, finished rows out: `add` queues rows, each `step` admits what fits and decodes one token.

    `decode(ids)` turns token ids into text (for stop strings); `eos_id` ends a row.
    """

    def __init__(self, model, slots: int, eos_id: int, pad_id: int, decode: Callable[[list[int]], str]):
        kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:  # a slot keeps every position; a sliding window would need to forget some
            raise ValueError(f"the local decoder needs full-attention layers; this model has {sorted(kinds)}")
        self.model, self.slots, self.eos_id, self.pad_id, self.decode = model, slots, eos_id, pad_id, decode
        self.device = next(model.parameters()).device
        self.cache = SlotCache(model.config.num_hidden_layers, slots)
        self.live: list[Row] = []
        self.pending: deque[Row] = deque()
        self.prefix: tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        """A prompt head shared by recent prompts: (its tokens, per layer its keys and values [1, H, len, D])."""

    @property
    def rows_in_flight(self) -> int:
        return len(self.live) + len(self.pending)

    def add(self, rows: list[Row]) -> None:
        self.pending.extend(rows)

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Admit waiting rows into free slots, then one decode step over the live rows; the rows that finished."""
        done = self._admit() if self.pending else []
        if self.live:
            done += self._decode()
        if not self.live and self.cache.capacity > IDLE_COLUMNS:
            self.cache = SlotCache(self.model.config.num_hidden_layers, self.slots)
        return done

    # ------------------------------------------------------------------ admission

    def _admit(self) -> list[Row]:
        """Prefill the prompts of the waiting rows that fit; sample their first tokens.

        Rows with max_tokens == 1 (prefix probes) need no slot: their one token comes from the
        prefill. Others wait for a slot; a refill waits until an eighth of the slots are free,
        so that prefills come in batches rather than one prompt per decode step.
        """
        free = self.slots - len(self.live)
        slotted = sum(r.max_tokens > 1 for r in self.pending)
        if self.live and free < min(max(1, self.slots // 8), slotted) and not any(r.max_tokens == 1 for r in self.pending):
            return []
        rows: list[Row] = []
        while self.pending and len(rows) < 4 * CHUNK_ROWS:
            r = self.pending[0]
            if r.max_tokens > 1:
                if free == 0:
                    break
                free -= 1
            rows.append(self.pending.popleft())
        return self._admit_group(rows) if rows else []

    def _admit_group(self, rows: list[Row]) -> list[Row]:
        prompts = list({id(r.prompt): r.prompt for r in rows}.values())
        shared = self._shared_prefix(prompts)
        done = []
        for batch in _by_length(prompts, shared):
            mine = {id(p): i for i, p in enumerate(batch)}
            batch_rows = [r for r in rows if id(r.prompt) in mine]
            logits, prefill, valid = self._prefill([p[shared:] for p in batch], shared)
            source = torch.tensor([mine[id(r.prompt)] for r in batch_rows], device=self.device)
            self._enter(batch_rows, source, prefill, valid, shared)
            for lo in range(0, len(batch_rows), CHUNK_ROWS):
                done += self._choose(batch_rows[lo : lo + CHUNK_ROWS], logits[source[lo : lo + CHUNK_ROWS]])
        self._drop_finished()
        return done

    def _enter(self, rows: list[Row], source: torch.Tensor, prefill: DynamicCache, valid: torch.Tensor, shared: int) -> None:
        """Give the rows that decode past their first token a slot, holding prefill row source[j]'s cache."""
        slotted = [j for j, r in enumerate(rows) if r.max_tokens > 1]
        if not slotted:
            return
        width = valid.shape[1]
        self.cache.reserve(width + max(rows[j].max_tokens for j in slotted) - 1, prefill.layers[0].keys)
        first = len(self.live)
        src = source[slotted]
        self.cache.store(torch.arange(first, first + len(slotted), device=self.device), src, prefill, valid[src])
        for j in slotted:
            rows[j].shared, rows[j].start, rows[j].col = shared, width - len(rows[j].prompt) + shared, width
        self.live += [rows[j] for j in slotted]

    def _shared_prefix(self, prompts: list[list[int]]) -> int:
        """Length of the kept prefix that every prompt starts with (0: none), computing a new one if worth it.

        Chat prompts share their template's head (SmolLM2's default system prompt is about 20
        tokens of ~45): its keys and values are computed once, kept, and copied into each slot,
        instead of being prefilled again with every prompt. Each prompt keeps at least one token
        of its own, whose logits give the first generated token.
        """
        room = min(len(p) for p in prompts) - 1
        if self.prefix is not None:
            common = min(room, *(_common_length(p, self.prefix[0]) for p in prompts))
            if common >= MIN_SHARED:
                return common
        if len(prompts) < 2:
            return 0
        common = min(room, *(_common_length(p, prompts[0]) for p in prompts[1:]))
        if common < MIN_SHARED:
            return 0
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=torch.tensor([prompts[0][:common]], device=self.device), past_key_values=cache,
                   use_cache=True, logits_to_keep=1)  # fmt: skip
        self.prefix = (prompts[0][:common], [(layer.keys, layer.values) for layer in cache.layers])
        return common

    def _prefill(self, prompts: list[list[int]], shared: int) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Left-padded forward over the prompts after the kept prefix's first `shared` tokens.

        Returns the last position's logits [U, V], the cache (prefix, padding, prompt) and valid [U, width].
        """
        pad = max(len(p) for p in prompts)
        n = len(prompts)
        ids = torch.tensor([[self.pad_id] * (pad - len(p)) + p for p in prompts], device=self.device)
        valid = torch.tensor([[True] * shared + [False] * (pad - len(p)) + [True] * len(p) for p in prompts],
                             device=self.device)  # fmt: skip
        positions = (valid.cumsum(1) - 1).clamp_min(0)[:, shared:]
        cache = DynamicCache(config=self.model.config)
        if shared:
            for i, (k, v) in enumerate(self.prefix[1]):
                cache.update(k[:, :, :shared].expand(n, -1, -1, -1), v[:, :, :shared].expand(n, -1, -1, -1), i)
        out = self.model(input_ids=ids, attention_mask=valid.long(), position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1], cache, valid

    # ------------------------------------------------------------------ decoding

    def _decode(self) -> list[Row]:
        live = self.live
        cols = torch.tensor([r.col for r in live], device=self.device)
        starts = torch.tensor([r.start for r in live], device=self.device)
        shared = torch.tensor([r.shared for r in live], device=self.device)
        width = max(r.col for r in live) + 1
        columns = torch.arange(width, device=self.device)
        mask = (columns < shared[:, None]) | ((columns >= starts[:, None]) & (columns <= cols[:, None]))
        if self.model.config._attn_implementation != "sdpa":  # eager attention adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=self.model.dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(self.model.dtype).min)  # fmt: skip
        self.cache.plan(cols, width)
        out = self.model(
            input_ids=torch.tensor([[r.tokens[-1]] for r in live], device=self.device),
            position_ids=(cols - starts + shared)[:, None],
            attention_mask=mask[:, None, None, :],
            past_key_values=self.cache,
            use_cache=True,
        )
        for r in live:
            r.col += 1
        done = self._choose(live, out.logits[:, -1])
        self._drop_finished()
        return done

    def _drop_finished(self) -> None:
        """Keep live rows in slots 0..n-1: each finished row's slot takes a survivor from the end."""
        live = self.live
        n = sum(r.finish is None for r in live)
        if n == len(live):
            return
        holes = [i for i in range(n) if live[i].finish is not None]
        movers = [i for i in range(n, len(live)) if live[i].finish is None]
        self.cache.move(movers, holes, max((live[i].col for i in movers), default=0))
        for h, m in zip(holes, movers):
            live[h] = live[m]
        self.live = live[:n]

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> list[Row]:
        """Sample each row's next token, record its logprobs if asked, and mark the rows that finish."""
        tokens = sample(logits, rows).tolist()
        asked = [i for i, r in enumerate(rows) if r.top_logprobs]
        if asked:
            idx = torch.tensor(asked, device=logits.device)
            logprobs = torch.log_softmax(logits[idx].float(), dim=-1)  # the raw distribution, as APIs report it
            top_lp, top_id = logprobs.topk(max(rows[i].top_logprobs for i in asked), dim=-1)
            chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in asked], device=logits.device))[:, 0]
            for i, lp, ids, lps in zip(asked, chosen.tolist(), top_id.tolist(), top_lp.tolist()):
                k = rows[i].top_logprobs
                rows[i].logprobs.append((lp, ids[:k], lps[:k]))
        done = []
        for r, t in zip(rows, tokens):
            r.tokens.append(t)
            if t == self.eos_id or (r.stop and self._stopped(r)):
                r.finish = "stop"
            elif len(r.tokens) >= r.max_tokens:
                r.finish = "length"
            if r.finish:
                done.append(r)
        return done

    def _stopped(self, row: Row) -> bool:
        text = self.decode(row.tokens)
        return any(s in text for s in row.stop)


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _by_length(prompts: list[list[int]], shared: int) -> list[list[list[int]]]:
    """Prompts sorted by length and cut into prefill batches that pad little.

    A batch grows while padding to its longest prompt costs at most a tenth more tokens than
    the prompts hold and stays within PREFILL_TOKENS.
    """
    batches: list[list[list[int]]] = []
    held = 0
    for p in sorted(prompts, key=len):
        n = len(p) - shared
        if batches and n * (len(batches[-1]) + 1) <= min(1.1 * (held + n), PREFILL_TOKENS):
            batches[-1].append(p)
            held += n
        else:
            batches.append([p])
            held = n
    return batches
