"""Tokenizers and chat templates.

Reference for the templates: Hugging Face transformers rendering the published qwen2 / llama3
Jinja chat templates (written out below) with ``apply_chat_template``, then tokenizing that
whole string; our piecewise rendering must give the same ids exactly. Reference for the labels:
the assistant replies tokenized on their own. Sentencepiece reference: ``sp.encode`` directly.
"""

from __future__ import annotations

import pytest
from data_fixtures import scratch_dir, tiny_tokenizer_dir

from megatron_longvila.data.batch import IGNORE_INDEX
from megatron_longvila.data.chat_template import (
    ConversationError,
    all_template_markers,
    get_template,
    normalize_conversation,
    tokenize_conversation,
    tokenize_prompt,
)
from megatron_longvila.data.synthetic import build_tiny_sentencepiece
from megatron_longvila.data.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, load_tokenizer

QWEN2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
REFERENCE_JINJA = {"qwen2": QWEN2_JINJA, "llama3": LLAMA3_JINJA}

CONVERSATIONS = [
    [
        {"from": "human", "value": "<video>\nWhat happens in the video?"},
        {"from": "gpt", "value": "A red square moves left, then stops."},
    ],
    [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "<image>\n<image>\nCompare the two images."},
        {"from": "gpt", "value": " The first is darker.  "},
        {"from": "human", "value": "Which number appears? 42 or 7"},
        {"from": "gpt", "value": "42"},
    ],
    [
        {"role": "user", "content": "Text only, no media at all."},
        {"role": "assistant", "content": "Fine!\nTwo lines."},
    ],
]


def _as_messages(turns):
    roles = {"human": "user", "gpt": "assistant"}
    return [
        {
            "role": roles.get(t.get("from"), t.get("from", t.get("role"))),
            "content": t.get("value", t.get("content")),
        }
        for t in turns
    ]


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
@pytest.mark.parametrize("turns", CONVERSATIONS, ids=["video", "system-images", "text"])
def test_template_ids_equal_transformers_rendering(name, turns):
    template = get_template(name)
    tok = load_tokenizer(tiny_tokenizer_dir(), template.markers)
    ids, labels = tokenize_conversation(turns, tok, template)
    text = tok.hf.apply_chat_template(
        _as_messages(turns),
        chat_template=REFERENCE_JINJA[name],
        tokenize=False,
        bos_token="<|begin_of_text|>",
    )
    reference = tok.hf.encode(text, add_special_tokens=False)
    assert ids.tolist() == reference
    assert ids.dtype == labels.dtype == ids.new_tensor(0).dtype


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_labels_are_exactly_the_assistant_replies(name):
    template = get_template(name)
    tok = load_tokenizer(tiny_tokenizer_dir(), template.markers)
    turns = CONVERSATIONS[1]
    ids, labels = tokenize_conversation(turns, tok, template)
    labeled = labels != IGNORE_INDEX
    assert (labels[labeled] == ids[labeled]).all(), "labels are aligned with input_ids"
    end = tok.special_id(template.turn_end)
    replies = [t["value"] for t in turns if t["from"] == "gpt"]
    if template.strip_content:
        replies = [r.strip() for r in replies]
    expected = [i for reply in replies for i in [*tok.encode(reply), end]]
    assert ids[labeled].tolist() == expected
    # The labeled tokens come in one contiguous run per reply.
    runs = (labeled[1:].int() - labeled[:-1].int() == 1).sum().item() + int(labeled[0])
    assert runs == len(replies)


def test_placeholders_and_pad_are_single_ids():
    tok = load_tokenizer(tiny_tokenizer_dir(), all_template_markers())
    for token in [IMAGE_TOKEN, VIDEO_TOKEN, "<|eot_id|>", "<|im_start|>"]:
        assert tok.hf.encode(token, add_special_tokens=False) == [tok.special_id(token)]
    ids, _ = tokenize_conversation(CONVERSATIONS[1], tok, get_template("qwen2"))
    assert (ids == tok.image_id).sum() == 2 and (ids == tok.video_id).sum() == 0
    assert tok.pad_id not in ids.tolist()
    text = "Any text, even ünïcode ✓ and 12345, round-trips."
    assert tok.decode(tok.encode(text)) == text


def test_prompt_is_the_conversation_prefix_before_the_reply():
    template = get_template("qwen2")
    tok = load_tokenizer(tiny_tokenizer_dir(), template.markers)
    turns = CONVERSATIONS[0]
    full, labels = tokenize_conversation(turns, tok, template)
    prompt = tokenize_prompt(turns[:1], tok, template)
    first_label = int((labels != IGNORE_INDEX).nonzero()[0])
    assert full[: len(prompt)].tolist() == prompt.tolist()
    assert len(prompt) == first_label


def test_sentencepiece_model_gets_appended_special_ids():
    import sentencepiece

    model = build_tiny_sentencepiece(scratch_dir() / "spm" / "tiny.model")
    template = get_template("llama3")
    tok = load_tokenizer(model, template.markers)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    base = sp.get_piece_size()
    specials = [tok.special_id(t) for t in [IMAGE_TOKEN, VIDEO_TOKEN, *template.markers]]
    assert sorted([*specials, tok.pad_id]) == list(range(base, tok.vocab_size))
    ids, labels = tokenize_conversation(CONVERSATIONS[0], tok, template)
    reply = CONVERSATIONS[0][1]["value"]
    end = tok.special_id("<|eot_id|>")
    assert ids[labels != IGNORE_INDEX].tolist() == [*sp.encode(reply), end]
    assert (ids == tok.video_id).sum() == 1
    assert tok.decode(ids.tolist()).startswith("<|begin_of_text|><|start_header_id|>")


@pytest.mark.parametrize(
    "turns, message",
    [
        ([], "non-empty"),
        ([{"from": "human", "value": "hi"}], "no assistant"),
        ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}], "unknown role"),
        (
            [{"from": "human", "value": "a"}, {"from": "system", "value": "b"}],
            "only turn 0",
        ),
        ([{"from": "human"}, {"from": "gpt", "value": "x"}], "no text"),
    ],
)
def test_bad_conversations_are_refused_with_the_reason(turns, message):
    with pytest.raises(ConversationError, match=message):
        normalize_conversation(turns)


def test_a_folder_without_tokenizer_files_is_refused(tmp_path):
    """transformers 5 loads an "empty" tokenizer from a bare LLM folder; the placeholders would
    then take ids 1 and 2, real vocabulary tokens of the model."""
    from transformers import Qwen2Config

    from megatron_longvila.convert import ConversionError, HFSource, read_longvila_config

    llm = tmp_path / "llm"
    Qwen2Config(vocab_size=64, hidden_size=8, num_hidden_layers=1).save_pretrained(llm)
    (llm / "tokenizer_config.json").write_text('{"model_max_length": 128}')  # settings only
    with pytest.raises(ValueError, match=f"no usable tokenizer in {llm}"):
        load_tokenizer(llm)
    # Converting such a folder without the ids given names it too (before reading the tower).
    with pytest.raises(ConversionError, match=f"no usable tokenizer in {llm}"):
        read_longvila_config(HFSource.from_parts(llm, tmp_path / "siglip"))
