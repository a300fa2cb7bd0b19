"""emokern.tokens: padded batches, pad and EOS ids, chat and plain prompts."""

import copy
import logging

import pytest
import torch

from emokern.tokens import (
    chat_prompt_ids,
    encode_prompts,
    eos_ids,
    pad_batch,
    pad_id,
    prompt_format,
)


def test_pad_batch_left_and_right():
    ids, mask, pos = pad_batch([[5, 6, 7], [8], []], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]
    ids, mask, pos = pad_batch([[5, 6, 7], [8]], 9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert ids.dtype == mask.dtype == pos.dtype == torch.long
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")


def test_pad_and_eos_ids(small_llama):
    model, tokenizer = small_llama
    assert pad_id(tokenizer) == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in eos_ids(model, tokenizer)


def test_chat_prompt_ids_end_with_the_assistant_header(small_llama):
    _, tokenizer = small_llama
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids).rstrip().endswith("assistant")


def test_encode_prompts_pads_left_and_restores_the_side(small_llama):
    _, tokenizer = small_llama
    tokenizer.padding_side = "right"
    enc = encode_prompts(tokenizer, ["Hi", "a much longer prompt than the first one"])
    assert tokenizer.padding_side == "right"
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][0, -1] == 1
    tokenizer.padding_side = "left"


@pytest.fixture
def plain_tokenizer(small_llama):
    """The tiny model's tokenizer without its chat template, as a base model's has none."""
    tokenizer = copy.deepcopy(small_llama[1])
    tokenizer.chat_template = None
    return tokenizer


def test_prompt_format_follows_the_chat_template(small_llama, plain_tokenizer):
    assert prompt_format(small_llama[1]) == "chat"
    assert prompt_format(plain_tokenizer) == "plain"


def test_a_tokenizer_without_a_template_gets_plain_prompts(plain_tokenizer, caplog):
    text = "The happiest day of my life was"
    with caplog.at_level(logging.INFO, logger="emokern.tokens"):
        enc = encode_prompts(plain_tokenizer, [text, "Hi"])
    assert "no chat template: prompts are plain text" in caplog.text
    # The plain text with the tokenizer's own special tokens (a base model's BOS), left-padded.
    assert enc["input_ids"][0].tolist() == plain_tokenizer(text)["input_ids"]
    assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][1, -1] == 1
    assert torch.equal(enc["input_ids"], encode_prompts(plain_tokenizer, [text, "Hi"],
                                                        chat=False)["input_ids"])
    ids = chat_prompt_ids(plain_tokenizer, [{"role": "user", "content": "Hi"}])
    assert plain_tokenizer.decode(ids).endswith("User: Hi\nAssistant:")


def test_plain_prompts_generate_and_steer(small_llama, plain_tokenizer, one_thread):
    from helpers import random_bank

    from emokern.steering.generation import generate

    model, _ = small_llama
    bank = random_bank(model)
    rows = generate(model, plain_tokenizer, bank, ["Once upon a time"],
                    [{"joy": 2.0}, {}], max_new_tokens=4, layers=[1], monitor_layers=None)
    assert len(rows) == 2 and all(isinstance(r["text"], str) for r in rows)
