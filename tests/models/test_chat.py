"""Chat templates: exact prompt strings per family, special-token encoding, stops, errors."""

from __future__ import annotations

import pytest

from scalign.data.tokenizer import Tokenizer
from scalign.models.chat import Special, render_chat, template_for

CONVO = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?"}]


def test_gemma_format():
    p = render_chat(CONVO, "gemma")
    assert p.text == ("<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n"
                      "<start_of_turn>model\n4<end_of_turn>\n"
                      "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n")
    assert p.stop_strings == ("<end_of_turn>", "<eos>")
    one = render_chat([{"role": "user", "content": "  hi \n"}], "gemma", add_bos=False,
                      add_generation_prompt=False)
    assert one.text == "<start_of_turn>user\nhi<end_of_turn>\n"


def test_llama2_format():
    p = render_chat(CONVO, "llama2")
    assert p.text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4 </s>"
                      "<s>[INST] And 3+3? [/INST]")
    assert p.stop_strings == ("</s>",)


def test_mistral_format():
    p = render_chat(CONVO[1:], "mistral")
    assert p.text == "<s>[INST] What is 2+2? [/INST]4</s>[INST] And 3+3? [/INST]"
    assert render_chat(CONVO, "mistral").text.startswith("<s>[INST] Be brief.\n\nWhat is 2+2?")


def test_llama3_format():
    p = render_chat(CONVO, "llama3")
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert p.text == ("<|begin_of_text|>" + h.format("system") + "Be brief.<|eot_id|>"
                      + h.format("user") + "What is 2+2?<|eot_id|>" + h.format("assistant")
                      + "4<|eot_id|>" + h.format("user") + "And 3+3?<|eot_id|>"
                      + h.format("assistant"))
    assert p.stop_strings == ("<|eot_id|>", "<|end_of_text|>")


def test_chatml_format():
    p = render_chat(CONVO, "chatml")
    assert p.text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?"
                      "<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n"
                      "And 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert Special("<|im_start|>") in p.segments


def test_family_templates():
    assert [template_for(f) for f in ("gemma", "gemma2", "gemma3", "llama", "mistral", "qwen2",
                                      "qwen3")] == ["gemma"] * 3 + ["llama2", "mistral",
                                                                    "chatml", "chatml"]
    with pytest.raises(ValueError, match="no chat template"):
        template_for("gpt2")


@pytest.fixture(scope="module")
def gemma_like_tokenizer() -> Tokenizer:
    corpus = ["What is two plus two? It is four. And three plus three is six."] * 8
    return Tokenizer.train(corpus, None, vocab_size=320,
                           user_defined_symbols=("<start_of_turn>", "<end_of_turn>"))


def test_encode_uses_special_ids(gemma_like_tokenizer):
    tok = gemma_like_tokenizer
    p = render_chat([{"role": "user", "content": "What is two plus two?"}], "gemma")
    ids = p.encode(tok)
    sot, eot = tok.piece_to_id("<start_of_turn>"), tok.piece_to_id("<end_of_turn>")
    assert ids[0] == tok.bos_id  # BOS by id: this tokenizer calls its bos piece "<s>"
    assert ids[1] == sot and eot in ids and ids.count(sot) == 2
    assert ids[-len(tok.encode("model\n")):] == tok.encode("model\n")
    assert tok.decode(ids) == p.text.replace("<bos>", "")
    assert p.stop_ids(tok) == [eot, tok.eos_id]


def test_missing_special_piece_is_an_error(gemma_like_tokenizer):
    p = render_chat([{"role": "user", "content": "hi"}], "chatml")
    with pytest.raises(KeyError, match="<\\|im_start\\|>"):
        p.encode(gemma_like_tokenizer)


@pytest.mark.parametrize("messages, match", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "x"}], "message 0: expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "message 1: expected role 'assistant'"),
    ([{"role": "tool", "content": "a"}], "role 'tool'"),
    ([{"role": "user", "content": 3}], "content must be a str"),
    ([{"content": "a"}], "'role' and 'content'"),
])
def test_invalid_conversations(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages, "gemma")
