"""emokern.tokens: padded batches, pad and EOS ids, chat prompts."""

import pytest
import torch

from emokern.tokens import chat_prompt_ids, encode_prompts, eos_ids, pad_batch, pad_id


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
