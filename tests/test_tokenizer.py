from unimoe.tokenizer import GENERATION_TOKENS, MEDIA_TOKENS, build_tokenizer


def test_round_trip_and_special_tokens(tokenizer):
    for text in ["What digit is this?", "héllo wörld 3.14 ✓", "  spaces\tand\nnewlines "]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    for token in [*MEDIA_TOKENS.values(), *GENERATION_TOKENS.values()]:
        ids = tokenizer(f"a{token}b")["input_ids"]
        assert tokenizer.convert_tokens_to_ids(token) in ids
    assert len(tokenizer) == 512
    assert tokenizer.padding_side == "left"


def test_build_is_deterministic():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert build_tokenizer(["zebra zebra zebra"] * 50).get_vocab() != a.get_vocab()


def test_chat_template_marks_assistant_tokens(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image", "path": "x.png"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "seven"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\n<|image|>What is it?<|im_end|>\n<|im_start|>assistant\nseven<|im_end|>\n"
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tokenizer.decode(ids) == "seven<|im_end|>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
