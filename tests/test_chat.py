"""Chat data: the model's chat template rendered as Hugging Face renders it, chat JSONL read as
training documents, and self-distillation of each conversation's last reply."""

import json
import shutil

import numpy as np
import pytest

from jaxinfer.chat import PLAIN, ChatTemplate, reply_prompt
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.train.data import load_text_tokens

# A ChatML-style template using what such templates use: bos_token, loops, conditionals,
# raise_exception, the generation prompt.
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATION = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Add two numbers. "},
                {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
  d = tmp_path_factory.mktemp("chat_model")
  for f in tiny_model_dir.iterdir():
    shutil.copy(f, d / f.name)
  tcfg = json.loads((d / "tokenizer_config.json").read_text())
  tcfg.update(chat_template=CHATML, bos_token="<|endoftext|>")
  (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
  return d


def test_chat_template_renders_as_hugging_face_does(chat_model_dir, tiny_model_dir):
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(str(chat_model_dir))
  ours = ChatTemplate.from_dir(chat_model_dir)
  for messages in (CONVERSATION, CONVERSATION[:2], CONVERSATION[1:2]):
    for gen in (False, True):
      assert ours.render(messages, gen) == hf.apply_chat_template(
          messages, tokenize=False, add_generation_prompt=gen)
  with pytest.raises(ValueError, match="unknown role tool"):
    ours.render([{"role": "tool", "content": "x"}])
  recursive = ChatTemplate("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", {}, "loops")
  with pytest.raises(ValueError, match=r"chat template \(loops\): maximum recursion depth"):
    recursive.render(CONVERSATION)  # (a RecursionError's traceback)
  plain = ChatTemplate.from_dir(tiny_model_dir)  # no template: the plain format
  assert plain.source == PLAIN
  assert plain.render(CONVERSATION[1:2], True) == "<|user|>\nAdd two numbers. \n<|assistant|>\n"
  assert reply_prompt(CONVERSATION) == CONVERSATION[:2]
  assert reply_prompt(CONVERSATION[:2]) == CONVERSATION[:2]


def test_templates_see_what_transformers_gives_them(tmp_path, chat_model_dir):
  """Special tokens from special_tokens_map.json too (a model whose BOS is only there rendered
  without it) and all seven of them (sep, cls and mask rendered empty); tools and documents as
  None (`tools is not none` held, then `tools|tojson` failed); a message's keys holding null left
  out (an exported history's "tool_calls": null failed its template); named templates without a
  default refused, as transformers refuses them (the plain format was used, unsaid)."""
  from transformers import AutoTokenizer
  d = tmp_path / "model"
  shutil.copytree(chat_model_dir, d)
  tcfg = json.loads((d / "tokenizer_config.json").read_text())
  del tcfg["bos_token"]
  tcfg["chat_template"] = (
      "{{ bos_token }}[{{ sep_token }}|{{ cls_token }}|{{ mask_token }}]"
      "{% if tools is not none %}{{ tools | tojson }}{% endif %}"
      "{% if documents is defined %}D{% endif %}{% for m in messages %}{{ m['role'] }}:"
      "{% if 'tool_calls' in m %}{{ m.tool_calls | length }}{% endif %}{{ m['content'] }};"
      "{% endfor %}")
  (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
  (d / "special_tokens_map.json").write_text(json.dumps(
      {name: {"content": "<|endoftext|>"} for name in ("bos_token", "sep_token", "cls_token",
                                                       "mask_token")}))
  messages = [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": "Hello!", "tool_calls": None}]
  want = AutoTokenizer.from_pretrained(str(d)).apply_chat_template(messages, tokenize=False)
  assert ChatTemplate.from_dir(d).render(messages) == want
  assert want.startswith("<|endoftext|>[<|endoftext|>|") and "assistant:Hello!" in want
  tcfg["chat_template"] = [{"name": "tool_use", "template": "{{ messages }}"}]
  (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
  with pytest.raises(ValueError, match=r"its chat templates \['tool_use'\] name none 'default'"):
    ChatTemplate.from_dir(d)


def test_a_chat_template_jinja_file_wins_and_renders_with_transformers_extensions(
    tmp_path, chat_model_dir):
  """chat_template.jinja (as transformers 5 saves a template) over tokenizer_config.json's,
  with what transformers' environment has: loop controls, the {% generation %} block, tojson's
  separators; a saved model keeps the file."""
  from transformers import AutoTokenizer

  from jaxinfer import checkpoint
  d = tmp_path / "model"
  shutil.copytree(chat_model_dir, d)
  template = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
              "[{{ m['role'] }}]{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] }}{% endgeneration %}{% else %}{{ m | tojson(separators=(',', ':')) }}"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
  (d / "chat_template.jinja").write_text(template)
  hf, ours = AutoTokenizer.from_pretrained(str(d)), ChatTemplate.from_dir(d)
  for messages in (CONVERSATION, CONVERSATION[1:]):
    assert ours.render(messages, True) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
  assert ours.render(CONVERSATION[1:]) == '[user]{"role":"user","content":"Add two numbers. "}' \
      '[assistant]def add(a, b):\n    return a + b'
  cfg, params, _ = checkpoint.load_model(str(d))
  checkpoint.save_hf(tmp_path / "saved", cfg, params, tokenizer_dir=d)
  assert ChatTemplate.from_dir(tmp_path / "saved").source == template
  # a model whose template is in tokenizer_config.json saved over it: the old file goes
  checkpoint.save_hf(tmp_path / "saved", cfg, params, tokenizer_dir=chat_model_dir)
  assert ChatTemplate.from_dir(tmp_path / "saved").source == CHATML


def test_chat_jsonl_is_read_as_rendered_documents(tmp_path, chat_model_dir):
  tok = Tokenizer.from_dir(chat_model_dir)
  chat = ChatTemplate.from_dir(chat_model_dir)
  data = tmp_path / "mixed.jsonl"
  data.write_text(json.dumps({"messages": CONVERSATION}) + "\n\n"
                  + json.dumps({"text": "x = 1"}) + "\n")
  tokens = load_text_tokens(data, tok, 0, chat)
  want = tok.encode(chat.render(CONVERSATION), add_special_tokens=False) + [0] + tok.encode(
      "x = 1") + [0]
  assert tokens.tolist() == want
  with pytest.raises(ValueError, match="chat template"):
    load_text_tokens(data, tok, 0)
  for bad, msg in (({"messages": []}, "non-empty"),
                   ({"messages": [{"role": "robot", "content": "hi"}]}, "message 0"),
                   ({"messages": [{"role": "user", "content": 3}]}, "message 0"),
                   ({"txt": "x"}, "'text'")):
    data.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=f"line 2.*{msg}|{msg}.*"):
      load_text_tokens(data, tok, 0, chat)


def test_self_distillation_rewrites_each_last_reply(tmp_path, chat_model_dir):
  from jaxinfer.draft_heads import distill
  from jaxinfer.generation import Generator, RowRequest
  from jaxinfer import checkpoint
  import jax
  tok = Tokenizer.from_dir(chat_model_dir)
  chat = ChatTemplate.from_dir(chat_model_dir)
  conversations = [CONVERSATION, CONVERSATION[1:2], [{"role": "user", "content": "Hello"}]]
  tokens = distill.chat(str(chat_model_dir), conversations, chat, tok, tmp_path / "d",
                        num_prompts=5, new_tokens=12, eos_id=0, progress=False)
  # each: the conversation before its last reply + the generation prompt, then the model's
  # greedy reply, ended by EOS
  cfg, params, _ = checkpoint.load_model(str(chat_model_dir))
  prompts = [tok.encode(chat.render(reply_prompt(c), True), add_special_tokens=False)
             for c in conversations]
  replies = Generator(cfg, params).generate([RowRequest(p, 12, jax.random.key(0))
                                              for p in prompts])
  want = []
  for p, r in zip(prompts, replies):
    want += p + r.tokens + ([] if r.tokens[-1:] == [0] else [0])
  assert tokens.tolist() == want
  # a sample of them, fixed by the seed
  two = distill.chat(str(chat_model_dir), conversations, chat, tok, tmp_path / "e",
                     num_prompts=2, new_tokens=12, eos_id=0, progress=False)
  assert 0 < len(two) < len(tokens)
  with pytest.raises(ValueError, match="no turn before"):
    distill.chat(str(chat_model_dir), [[CONVERSATION[2]]], chat, tok, tmp_path / "f",
                 num_prompts=1, progress=False)


def test_generate_takes_conversations(tmp_path, chat_model_dir):
  from jaxinfer.runner import GenerateJob, run
  tok = Tokenizer.from_dir(chat_model_dir)
  rendered = tok.encode(ChatTemplate.from_dir(chat_model_dir).render(CONVERSATION[:2], True),
                        add_special_tokens=False)
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in [
      {"id": "chat", "messages": CONVERSATION[:2], "max_new_tokens": 10},
      {"id": "ids", "prompt_ids": rendered, "max_new_tokens": 10},
      {"id": "bad", "messages": [{"role": "user"}]},
      {"id": "both", "messages": CONVERSATION[:1], "prompt": "x"}]))
  out = tmp_path / "out.jsonl"
  run(GenerateJob(prompts=str(prompts), output=str(out), model=str(chat_model_dir),
                  scheduler="static", mesh="data:1", progress=False))
  recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
  assert recs["chat"]["completion_ids"] == recs["ids"]["completion_ids"]
  assert recs["chat"]["prompt_tokens"] == len(rendered)
  assert "message 0" in recs["bad"]["error"] and "exactly one" in recs["both"]["error"]
