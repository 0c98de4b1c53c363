"""A tokenizer that is built here, for presets trained from scratch offline (real checkpoints bring their own).

Byte-level BPE (every string round-trips, nothing is ever unknown) trained with 🤗 ``tokenizers`` on a small
built-in English corpus plus any text the caller adds (the recipe adds its training text), wrapped as a
``PreTrainedTokenizerFast`` with a ChatML chat template that turns media parts into placeholder tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from unimoe.errors import ConfigError

PAD, EOS = "<|endoftext|>", "<|im_end|>"
IM_START = "<|im_start|>"
#: One placeholder token per media type; a message part ``{"type": "image", ...}`` becomes ``<|image|>``.
MEDIA_TOKENS = {
    "image": "<|image|>",
    "audio": "<|audio|>",
    "video": "<|video|>",
    "points": "<|points|>",
    "series": "<|series|>",
}
#: Query tokens that ask the model to generate a modality (used by the generation heads).
GENERATION_TOKENS = {"image": "<|gen_image|>", "audio": "<|gen_audio|>", "series": "<|gen_series|>"}
#: The slots of a generation head's learnable queries, which follow its generation token (their embeddings are
#: replaced by the head's query embeddings). They took the ids of the first three reserved tokens.
QUERY_TOKENS = {"image": "<|query_image|>", "audio": "<|query_audio|>", "series": "<|query_series|>"}
RESERVED_TOKENS = [f"<|reserved_{i}|>" for i in range(3, 8)]
SPECIAL_TOKENS = [
    PAD, IM_START, EOS, *MEDIA_TOKENS.values(), *GENERATION_TOKENS.values(), *QUERY_TOKENS.values(), *RESERVED_TOKENS
]  # fmt: skip

# ChatML. Media parts of user turns render as their placeholder token (the processor expands each into the
# connector's number of tokens); media parts of assistant turns are generation targets and render as the
# generation token (the processor appends the head's query slots). `{% generation %}` marks assistant tokens so
# `return_assistant_tokens_mask` can build the labels.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{% else %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}{{ '<|gen_' + part['type'] + '|>' }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>' }}{% endgeneration %}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}{{ '<|' + part['type'] + '|>' }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>' }}"
    "{% endif %}"
    "{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
_WORDS = (
    "what which who where when how is are was the a an this that these there of in on to from with and or not yes no "
    "digit number image picture photo video clip audio sound speech word say said spoken point cloud shape series "
    "time value values next forecast predict draw generate describe answer question color colour red green blue "
    "yellow black white gray grey circle square triangle rectangle box sphere cylinder cone torus capsule moving "
    "moves left right up down class label it its does do show shows contain contains kind type object many count "
    "increasing decreasing higher lower first last small large big user assistant system please you I"
).split()


def builtin_media_token_ids() -> dict[str, int]:
    """Ids of the media placeholders in tokenizers from :func:`build_tokenizer` (special tokens come first)."""
    return {m: SPECIAL_TOKENS.index(t) for m, t in MEDIA_TOKENS.items()}


def builtin_generation_token_ids() -> dict[str, dict[str, int]]:
    """``{modality: {"gen": id, "query": id}}`` in tokenizers from :func:`build_tokenizer`."""
    return {
        m: {"gen": SPECIAL_TOKENS.index(GENERATION_TOKENS[m]), "query": SPECIAL_TOKENS.index(QUERY_TOKENS[m])}
        for m in GENERATION_TOKENS
    }


def builtin_corpus() -> list[str]:
    """A few thousand short English lines covering the vocabulary of the built-in tasks."""
    lines = [" ".join(_WORDS), " ".join(_NUMBER_WORDS)]
    for a, b in itertools.product(_WORDS[:60], _NUMBER_WORDS):
        lines.append(f"What {a} is {b}? The answer is {b}.")
    lines += [f"{i} {i * 7 % 100} {i / 8:.3f} -{i}" for i in range(200)]
    return lines


def build_tokenizer(
    extra_text: Iterable[str] = (), *, vocab_size: int = 512, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (deterministic for the same text) and wrap it for transformers."""
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ConfigError(
            f"tokenizer.vocab_size: must be at least {min_size} (bytes + special tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(itertools.chain(builtin_corpus(), extra_text), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=None,
        model_max_length=model_max_length,
        padding_side="left",  # left padding: batched generation and batch-size-invariant eval
        extra_special_tokens={},
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
