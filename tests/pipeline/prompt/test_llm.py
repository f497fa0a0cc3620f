"""The LLM recaptioner with real components: a tiny GPT-2 built and saved here (its tokenizer trained
here too), loaded through transformers from a folder and from the loopback S3 store; and a real
OpenAI-compatible HTTP server on 127.0.0.1 talked to with the real `openai` client.

The tiny model answers gibberish, so every caption it gives must be refused and the user's words kept
by the fallback; the server's answers are deterministic functions of the request, good or lossy.
"""

import json
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.prompt.llm import LLMRecaptioner, check_caption, clean_answer, content_words, parse_spec
from pipeline.prompt.plain import PlainRecaptioner
from pipeline.prompt.recaption import check_recaptioner_spec, load_recaptioner

CORPUS = [
    "A red circle moves from the left to the right of the frame on a plain navy background.",
    "A blue square grows larger in the centre of the frame on a plain black background.",
    "A brown dog runs along a sunny beach. The camera is static.",
    "Two paper boats drift down a stream past orange leaves.",
]
PROMPT = "crimson ball bouncing to the left on a dark backdrop"


def _save_tiny_model(folder, seed, chat_template=None):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    if chat_template:
        fast.chat_template = chat_template
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=1024, vocab_size=len(fast),
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id,
                        pad_token_id=fast.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    return {"a": _save_tiny_model(root / "a" / "tiny", seed=0),
            "b": _save_tiny_model(root / "b" / "tiny", seed=1),
            "chat": _save_tiny_model(root / "chat" / "tiny-chat", seed=2, chat_template=TEMPLATE)}


# -- the safety net, on its own ------------------------------------------------------------------------

def test_clean_answer():
    assert clean_answer('Sure! Here is the caption:\n\n"A red ball rolls left on gray. The camera is static."\n\n'
                        "Let me know if you want changes.") == "A red ball rolls left on gray. The camera is static."
    assert clean_answer("<think>the user wants a ball</think>\nCaption: a red ball rolls") == "A red ball rolls."
    assert clean_answer("**Caption:** A red ball rolls.") == "A red ball rolls."
    assert clean_answer("Caption:\nA cat sits on a mat.\nThe camera is static.\n\nNotes: none") == \
        "A cat sits on a mat. The camera is static."
    assert clean_answer("  \n \"\" \n") == ""
    long = clean_answer("A red ball rolls. " * 100, max_chars=100)
    assert len(long) <= 100 and long.endswith("rolls.")


def test_check_caption_keeps_the_users_words():
    assert content_words("Please make a video of a crimson ball bouncing to the left, 3 stars") == \
        ["crimson", "ball", "bouncing", "left", "3", "stars"]
    ok = "A crimson ball bounces from the right to the left of the frame on gray. The camera is static."
    assert check_caption("crimson ball bouncing left", ok) == ""                 # variants count: bounces
    assert check_caption("dogs running on beaches", "A dog runs along a beach.") == ""
    assert check_caption("crimson ball bouncing left", "A red ball bounces left.") == "dropped crimson"
    assert check_caption("two dogs on a beach", "Dogs on a sandy beach.") == "dropped two"
    assert check_caption("a dog on a beach without a leash", "A dog on a sandy beach.") == "dropped a negation"
    verdict = check_caption("a big fluffy dog chasing seagulls on a sunny beach", "A dog on a beach.")
    assert verdict.startswith("kept 2/7")
    assert check_caption("a big fluffy dog chasing seagulls on a sunny beach", "A dog on a beach.", keep=0.2) == ""
    assert check_caption("a cat", "I'm sorry, I can't help with that cat.") == "refusal"
    assert check_caption("a cat", "") == "empty answer"


def test_specs():
    assert parse_spec("llm:s3://bucket/models/qwen;fallback=shapes;keep=0.5").options == \
        {"fallback": "shapes", "keep": "0.5"}
    s = parse_spec("openai:qwen2.5-7b@http://10.0.0.5:8000/v1;timeout=3")
    assert (s.backend, s.model, s.base_url, s.options) == ("openai", "qwen2.5-7b", "http://10.0.0.5:8000/v1",
                                                           {"timeout": "3"})
    assert parse_spec("openai:gpt-4o-mini").base_url is None
    for bad in ("llm:", "llm:/m;bogus=1", "llm:/m;keep=x", "llm:/m;keep=2", "openai:m@ftp://x", "openai:",
                "llm:m@http://h/v1", "gpt:x", "nope"):
        with pytest.raises(ValueError) as e:
            check_recaptioner_spec(bad)
        assert "llm:PATH_OR_URI" in str(e.value) and "openai:MODEL@BASE_URL" in str(e.value), bad
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError):
            load_recaptioner(bad)
    check_recaptioner_spec("plain")
    check_recaptioner_spec("llm:/not/loaded/here")                              # syntax only: loads nothing


# -- transformers: a tiny causal LM from a folder or an object store ----------------------------------

def test_hf_gibberish_falls_back_and_keeps_the_words(tiny_models):
    import torch

    r = load_recaptioner(f"llm:{tiny_models['a']};temperature=1.0;max_tokens=24")
    assert isinstance(r, LLMRecaptioner) and r.name.startswith("llm-1:hf:tiny:")
    rng = torch.get_rng_state()
    out = r.recaption_with_source(PROMPT, 3)
    assert torch.equal(rng, torch.get_rng_state())                              # the caller's RNG is untouched
    assert out.source == "fallback" and r.last_source == "fallback" and out.reason and out.raw is not None
    assert out.caption == load_recaptioner("plain").recaption(PROMPT, 3)
    assert isinstance(r.recaption(PROMPT, 3), str)
    assert r.stats == {"llm": 0, "fallback": 2}
    # Same (prompt, seed) → same answer; the seed changes what is sampled.
    raws = [r.recaption_with_source(PROMPT, seed).raw for seed in range(4)]
    assert raws == [r.recaption_with_source(PROMPT, seed).raw for seed in range(4)]
    assert len(set(raws)) > 1
    # Greedy: the seed is unused.
    g = LLMRecaptioner("hf", tiny_models["a"], temperature=0, max_new_tokens=12)
    assert len({g.recaption_with_source(PROMPT, seed).raw for seed in range(3)}) == 1


def test_hf_prompt_uses_the_chat_template_when_there_is_one(tiny_models):
    plain = LLMRecaptioner("hf", tiny_models["a"], max_new_tokens=4)
    text, templated = plain.backend.prompt_text(plain.messages(PROMPT))
    assert not templated and text.endswith(f"Prompt: {PROMPT}\nCaption:") and "The camera is static." in text
    chat = LLMRecaptioner("hf", tiny_models["chat"], max_new_tokens=4)
    text, templated = chat.backend.prompt_text(chat.messages(PROMPT))
    assert templated and text.startswith("<|system|> You rewrite")
    assert text.endswith(f"<|user|> {PROMPT}\n<|assistant|>")
    assert chat.recaption_with_source(PROMPT, 0).source == "fallback"
    # A template that refuses a system turn gets the instructions folded into the first user turn.
    chat.backend.tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|{{ m.role }}|> {{ m.content }}\n{% endfor %}<|assistant|>")
    text, templated = chat.backend.prompt_text(chat.messages(PROMPT))
    assert templated and text.startswith("<|user|> You rewrite") and "<|system|>" not in text


def test_hf_name_follows_the_model_and_the_settings(tiny_models, tmp_path):
    a = LLMRecaptioner("hf", tiny_models["a"], max_new_tokens=4)
    b = LLMRecaptioner("hf", tiny_models["b"], max_new_tokens=4)
    assert a.name != b.name                                  # other weights, same folder name
    copy = shutil.copytree(tiny_models["a"], tmp_path / "tiny")
    assert LLMRecaptioner("hf", str(copy), max_new_tokens=4).name == a.name     # a moved copy keeps its name
    assert LLMRecaptioner("hf", str(copy), max_new_tokens=4, system_prompt="Describe it.").name != a.name
    plain = PlainRecaptioner()
    assert LLMRecaptioner("hf", tiny_models["a"], max_new_tokens=4, fallback=plain, keep=0.5).name != a.name
    assert LLMRecaptioner("hf", tiny_models["chat"], max_new_tokens=4).name.startswith("llm-1:hf:tiny-chat:")


def test_hf_from_object_store(tiny_models, bucket, tmp_path, monkeypatch):
    import fsspec

    import models.files

    monkeypatch.setattr(models.files, "CACHE_DIR", tmp_path / "cache")
    fs = fsspec.filesystem("s3")
    fs.put(tiny_models["a"] + "/", f"{bucket}/models/tiny", recursive=True)
    r = load_recaptioner(f"llm:s3://{bucket}/models/tiny;max_tokens=8")
    assert r.backend.path.startswith(str(tmp_path / "cache"))
    assert r.name == LLMRecaptioner("hf", tiny_models["a"], max_new_tokens=8).name
    assert r.recaption(PROMPT, 1) == load_recaptioner("plain").recaption(PROMPT, 1)


# -- an OpenAI-compatible endpoint ----------------------------------------------------------------------

BACKGROUNDS = ("gray", "black", "navy", "brown")


def _answer(model, prompt, seed):
    if model == "good":      # chatty, but the caption keeps every word and the seed fills the background
        return (f"Sure! Here is the caption:\n\n\"{prompt[0].upper() + prompt[1:]} on a plain "
                f"{BACKGROUNDS[seed % 4]} background. The camera is static.\"\n\nLet me know if you want changes.")
    if model == "lossy":
        return "A cat sits on a sofa. The camera is static."
    if model == "slow":
        time.sleep(3)
        return "too late"
    raise KeyError(model)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "not found"}})
        prompt = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        try:
            content = _answer(body["model"], prompt, body.get("seed") or 0)
        except KeyError:
            error = {"message": f"model {body['model']} not found", "type": "invalid_request_error"}
            return self._send(404, {"error": error})
        self._send(200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server):
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def test_openai_good_answer_is_used(endpoint, monkeypatch):
    monkeypatch.setenv("RECAPTION_TEST_KEY", "sekrit")
    r = load_recaptioner(f"openai:good@{_url(endpoint)};key_env=RECAPTION_TEST_KEY;timeout=10;retries=0")
    assert isinstance(r, LLMRecaptioner) and r.name.startswith("llm-1:openai:good:")
    n = len(endpoint.requests)
    out = r.recaption_with_source(PROMPT, 7)
    assert out.source == "llm" and r.last_source == "llm" and out.reason == ""
    assert out.caption == f"{PROMPT[0].upper() + PROMPT[1:]} on a plain brown background. The camera is static."
    sent = endpoint.requests[n]
    assert sent["body"]["seed"] == 7 and sent["body"]["model"] == "good" and sent["auth"] == "Bearer sekrit"
    assert sent["body"]["messages"][0]["role"] == "system" and sent["body"]["messages"][-1]["content"] == PROMPT
    expected = f"{PROMPT[0].upper() + PROMPT[1:]} on a plain gray background. The camera is static."
    assert r.recaption(PROMPT, 4) == expected
    assert r.recaption(PROMPT, 7) == out.caption and len(endpoint.requests) == n + 2   # asked once per (prompt, seed)
    assert r.stats == {"llm": 3, "fallback": 0}


def test_openai_lossy_answer_falls_back(endpoint):
    r = LLMRecaptioner("openai", "lossy", base_url=_url(endpoint), timeout=10, max_retries=0)
    out = r.recaption_with_source(PROMPT, 1)
    assert out.source == "fallback" and out.reason == "dropped crimson" and out.raw.startswith("A cat")
    assert out.caption == "Crimson ball bouncing to the left on a dark backdrop."
    assert r.name != LLMRecaptioner("openai", "good", base_url=_url(endpoint)).name
    # A model the server does not have: an API error, the same fallback.
    out = LLMRecaptioner("openai", "missing", base_url=_url(endpoint), max_retries=0).recaption_with_source(PROMPT, 1)
    assert out.source == "fallback" and out.reason.startswith("NotFoundError") and out.raw is None


def test_openai_timeout_and_endpoint_down_fall_back_quickly(endpoint):
    r = LLMRecaptioner("openai", "slow", base_url=_url(endpoint), timeout=0.5, max_retries=0)
    t0 = time.perf_counter()
    out = r.recaption_with_source(PROMPT, 0)
    assert out.source == "fallback" and "Timeout" in out.reason and time.perf_counter() - t0 < 2.5

    with socket.socket() as s:                                 # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = load_recaptioner(f"openai:good@http://127.0.0.1:{port}/v1;timeout=2;retries=0")
    t0 = time.perf_counter()
    out = r.recaption_with_source(PROMPT, 0)
    assert out.source == "fallback" and "Connection" in out.reason and time.perf_counter() - t0 < 2
    assert out.caption == load_recaptioner("plain").recaption(PROMPT, 0)


def test_openai_needs_a_key_only_for_the_default_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        load_recaptioner("openai:gpt-4o-mini")
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR"):
        load_recaptioner("openai:m@http://127.0.0.1:9/v1;key_env=NO_SUCH_KEY_VAR")
