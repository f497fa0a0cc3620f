"""An optional LLM recaptioner: a language model rewrites the user's prompt into the detailed caption
style, behind the same `Recaptioner` interface as "plain" and "shapes" (see `pipeline.prompt.recaption`).

Two backends:

* "hf": a transformers causal LM (`AutoModelForCausalLM` + `AutoTokenizer`) from a local folder or an
  fsspec URI (copied once to the local cache by `models.interface.local_model_dir`), loaded with
  `local_files_only=True`: nothing is ever downloaded from a hub. The tokenizer's chat template is used
  when it has one, else a plain "Prompt: ... / Caption:" completion prompt.
* "openai": any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, Ollama, ...)
  through the official `openai` client (`pip install reelforge[llm]`); the seed is sent with the request.

Spec strings (what `load_recaptioner`, the CLI's `--recaptioner` and a model config's `recaptioner` take):

    llm:PATH_OR_URI[;OPTION=VALUE...]          llm:/models/qwen2.5-1.5b-instruct   llm:s3://bucket/models/qwen
    openai:MODEL[@BASE_URL][;OPTION=VALUE...]  openai:qwen2.5-7b@http://10.0.0.5:8000/v1   openai:gpt-4o-mini

Options (all optional):
    fallback=NAME      registered recaptioner used whenever the LLM's answer is not kept (default: plain;
                       `pipeline.prompt.recaption.load_recaptioner` loads it and hands it to `from_spec`)
    keep=FRACTION      share of the prompt's content words the caption must keep (default 0.8)
    temperature=T      sampling temperature, seeded per clip (default 0.7); 0 = greedy, the seed is unused
    max_tokens=N       most new tokens per caption (default 160)
    system=PATH        a text file holding the whole system prompt (no built-in examples are sent then);
                       default: `DEFAULT_SYSTEM_PROMPT` and `DEFAULT_EXAMPLES` as earlier chat turns
    device=DEVICE      hf only: torch device (default: cuda when available, else cpu)
    timeout=SECONDS    openai only: per-request timeout (default 30)
    retries=N          openai only: client retries (default 2)
    key_env=VAR        openai only: environment variable holding the API key (default OPENAI_API_KEY)

Without a BASE_URL the client's default applies (OPENAI_BASE_URL, else api.openai.com, which needs a key).

The safety net: the user's words come first. The answer is cleaned (reasoning blocks, preambles,
"Caption:" prefixes, quotes and trailing chatter removed, length capped) and then kept only if it is
non-empty, is not a refusal, keeps every colour word, number and negation of the prompt, and keeps at
least `keep` of the prompt's other content words (simple morphological variants count: "runs" keeps
"running"). Otherwise — and whenever the model or the endpoint fails or times out — the fallback
recaptioner's caption is returned. `recaption()` always returns a str; `recaption_with_source()` also
says which path was taken ("llm" or "fallback") and why, and `last_source` / `stats` keep count.

`name` is "llm-1:hf:<folder name>:<digest>" or "llm-1:openai:<model>:<digest>", the digest covering the
model (for hf, a fingerprint of its files, so a moved copy keeps its name and changed weights do not),
the system prompt and examples, the generation settings and the fallback's name: changing any of them
changes the name, which the metadata records.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pipeline.prompt.plain import PlainRecaptioner, Recaptioner

log = logging.getLogger(__name__)

VERSION = 1
SPEC_HELP = ("write 'llm:PATH_OR_URI' (a local transformers causal LM) or 'openai:MODEL@BASE_URL' "
             "(an OpenAI-compatible endpoint), optionally followed by ';fallback=NAME;keep=0.8;temperature=0.7'")

DEFAULT_SYSTEM_PROMPT = """\
You rewrite a user's short prompt for a text-to-video model into the detailed caption style that the \
model was trained on.

Write one detailed sentence that describes the main subject (what it is, its colour, its shape or \
look), what it does and how it moves through the frame, and the background or setting. Then, unless \
the prompt says something about the camera, add the sentence "The camera is static." If the prompt \
describes the camera, describe what the camera does in that second sentence instead.

Rules:
- Keep every detail the user gave, in the user's own words for objects, colours, numbers, names and \
actions; never drop, replace or contradict any of them.
- Fill in only what the prompt leaves open (a colour, a motion, a background) with plain, ordinary \
choices; do not add new objects, people, text or logos.
- Plain present-tense prose. Answer with the caption only: no preamble, no quotes, no notes."""

DEFAULT_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("crimson ball slides left",
     "A crimson ball slides from the right to the left of the frame on a plain gray background. "
     "The camera is static."),
    ("a dog running on a beach, drone shot",
     "A brown dog is running along the wet sand of a sunny beach from the left to the right of the frame, "
     "with small waves rolling in behind it. A drone camera follows the dog from above."),
    ("blue square growing on black",
     "A blue square grows larger and larger in the centre of the frame on a plain black background. "
     "The camera is static."),
    ("two paper boats drift down a stream in autumn",
     "Two white paper boats drift slowly down a narrow stream from the top to the bottom of the frame, "
     "past rocks and floating orange autumn leaves. The camera is static."),
)

# Words that carry no content of their own: articles, pronouns, auxiliaries, prepositions, and the
# requests users wrap prompts in ("please make a video of ...").
STOP_WORDS = frozenset("""
a an the and or but nor so yet of to in on at by for from with without into onto over under above below
up down off out about across along around through toward towards between behind near far past
is are was were be been being am do does did doing done have has had having can could will would shall
should may might must let lets it its it's this that these those there here then than as if while when
where which who whom whose what how why i me my we us our you your he him his she her they them their
one ones some any all each every both either neither other another such same very really quite just
also only too again more most much many few lot lots bit kind sort thing things something someone
please make makes made create creates generate render draw show shows showing want wanted need like
video videos clip clips animation movie film footage scene image picture gif frame frames
""".split())
COLOUR_WORDS = frozenset("""
red orange yellow green blue purple violet pink white black gray grey brown cyan magenta gold golden
silver navy teal turquoise beige maroon crimson scarlet indigo lime olive
""".split())
NEGATIONS = frozenset({"no", "not", "never", "without", "none", "nothing", "nobody", "neither", "nor"})
NUMBER_WORDS = frozenset("two three four five six seven eight nine ten eleven twelve dozen hundred".split())
_SYNONYMS = {"grey": "gray", "colour": "color", "centre": "center", "golden": "gold"}

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_PREFIX = re.compile(r"^\W*(?:(?:the\s+)?(?:re)?caption(?:ed)?|output|answer|rewritten(?:\s+prompt)?|prompt)"
                     r"\W{0,3}?\s*[:\-–]\s*", re.I)
_PREAMBLE = re.compile(r"^(?:sure|okay|ok|certainly|of course|absolutely)\b", re.I)
_LEAD = re.compile(r"^(?:(?:sure|okay|ok|certainly|of course|absolutely)\b[!,.]?\s*)?"
                   r"(?:here(?:'s| is)\b[^:]{0,80}:\s*)?", re.I)
_SIGN_OFF = re.compile(r"\s(?:let me know|i hope|feel free|note:|this caption)\b.*$", re.I)
_REFUSAL = re.compile(r"^(?:i'm sorry|i am sorry|sorry,|i can(?:not|'t)|i won't|as an ai)", re.I)
_QUOTES = "\"'`*“”‘’«»"


class LLMCaption(NamedTuple):
    caption: str
    source: str          # "llm" or "fallback"
    reason: str          # why the fallback was taken ("" when the LLM's caption was kept)
    raw: str | None      # the model's raw answer (None when it failed before answering)


# -- the safety net -----------------------------------------------------------------------------------

def _is_preamble(line: str) -> bool:
    bare = line.strip(_QUOTES + " ")
    return bare.endswith(":") or bool(_PREAMBLE.match(bare)) and len(bare) < 40 and bare[-1] in "!.,"


def clean_answer(text: str, max_chars: int = 600) -> str:
    """The caption inside an LLM's answer: reasoning blocks, preambles ("Sure! Here is the caption:"),
    "Caption:" prefixes, surrounding quotes, sign-offs and anything after the first paragraph removed;
    whitespace collapsed, first letter capitalised, a closing full stop, at most `max_chars` (cut at
    a sentence end when there is one)."""
    text = _THINK.sub("", text or "")
    paragraph: list[str] = []
    for line in text.strip().splitlines():
        if not line.strip(_QUOTES + " \t"):
            if paragraph:
                break
            continue
        if not paragraph and _is_preamble(line):
            continue
        paragraph.append(line.strip())
    caption = " ".join(" ".join(paragraph).split())
    caption = _LEAD.sub("", caption)
    for _ in range(2):
        caption = _PREFIX.sub("", caption).strip().strip(_QUOTES).strip()
    caption = _SIGN_OFF.sub("", caption).strip().strip(_QUOTES).strip()
    if len(caption) > max_chars:
        cut = caption[:max_chars]
        end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
        caption = cut[:end + 1] if end > 0 else cut.rsplit(" ", 1)[0]
    caption = caption.strip(" ,;:-")
    if not caption:
        return ""
    caption = caption[0].upper() + caption[1:]
    return caption if caption[-1] in ".!?" else caption + "."


def _words(text: str) -> list[str]:
    return [_SYNONYMS.get(w, w) for w in _WORD.findall(text.lower().replace("’", "'"))]


def _stem(word: str) -> str:
    """A crude suffix-stripper: enough to match "runs"/"running"/"ran"-less variants of one word."""
    w = word.split("'")[0]
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("ying", "y"), ("ing", ""), ("es", ""), ("ed", ""),
                         ("ly", ""), ("s", ""), ("er", ""), ("est", "")):
        if len(w) - len(suffix) >= 3 and w.endswith(suffix) and not w.endswith("ss"):
            w = w[: len(w) - len(suffix)] + repl
            break
    if len(w) >= 4 and w[-1] == w[-2] and w[-1] not in "aeiouls":
        w = w[:-1]                                     # running → runn → run
    if len(w) >= 4 and w.endswith("e"):
        w = w[:-1]                                     # move / moving / moves → mov
    return w.replace("y", "i") if w.endswith("y") else w


def content_words(prompt: str) -> list[str]:
    """The prompt's content words (no stop words, no negations), in order, without repeats."""
    seen: dict[str, None] = {}
    for w in _words(prompt):
        if w not in STOP_WORDS and w not in NEGATIONS and (len(w) > 1 or w.isdigit()):
            seen.setdefault(w, None)
    return list(seen)


def _kept(word: str, caption_words: set[str], caption_stems: set[str]) -> bool:
    if word in caption_words:
        return True
    stem = _stem(word)
    if stem in caption_stems:
        return True
    return len(stem) >= 5 and any(len(s) >= 5 and (s.startswith(stem) or stem.startswith(s)) for s in caption_stems)


def check_caption(prompt: str, caption: str, keep: float = 0.8) -> str:
    """Why `caption` drops what the user said in `prompt`, or "" when it keeps it: every colour word,
    number and negation of the prompt, and at least `keep` of its other content words."""
    if not caption.strip():
        return "empty answer"
    if _REFUSAL.match(caption):
        return "refusal"
    words = _words(caption)
    caption_words = set(words)
    caption_stems = {_stem(w) for w in words}
    wanted = content_words(prompt)
    lost = [w for w in wanted if not _kept(w, caption_words, caption_stems)]
    strict = [w for w in lost if w in COLOUR_WORDS or w in NUMBER_WORDS or any(c.isdigit() for c in w)]
    if strict:
        return f"dropped {', '.join(strict)}"
    if any(w in NEGATIONS for w in _words(prompt)) and not caption_words & NEGATIONS:
        return "dropped a negation"
    if wanted and (len(wanted) - len(lost)) / len(wanted) < keep:
        return f"kept {len(wanted) - len(lost)}/{len(wanted)} content words (dropped {', '.join(lost)})"
    return ""


# -- the spec -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LLMSpec:
    backend: str                                 # "hf" or "openai"
    model: str                                   # a path/URI (hf) or a model name (openai)
    base_url: str | None = None
    options: dict[str, str] = field(default_factory=dict)


_OPTIONS = {"fallback", "keep", "temperature", "max_tokens", "system", "device", "timeout", "retries", "key_env"}
_OPTION_TYPES = {"keep": float, "temperature": float, "max_tokens": int, "timeout": float, "retries": int}


def parse_spec(spec: str) -> LLMSpec:
    """`llm:PATH_OR_URI[;k=v...]` or `openai:MODEL[@BASE_URL][;k=v...]` → LLMSpec; ValueError otherwise."""
    def bad(why: str) -> ValueError:
        return ValueError(f"bad LLM recaptioner {spec!r}: {why}; {SPEC_HELP}")

    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("llm", "openai"):
        raise bad("it must start with 'llm:' or 'openai:'")
    target, *opts = [p.strip() for p in rest.split(";")]
    options: dict[str, str] = {}
    for opt in opts:
        if not opt:
            continue
        key, eq, value = opt.partition("=")
        if not eq or key.strip() not in _OPTIONS or not value.strip():
            raise bad(f"unknown option {opt!r} (options: {', '.join(sorted(_OPTIONS))})")
        key, value = key.strip(), value.strip()
        if key in _OPTION_TYPES:
            try:
                _OPTION_TYPES[key](value)
            except ValueError:
                raise bad(f"option {key}={value!r} is not a number") from None
        options[key] = value
    if not 0.0 <= float(options.get("keep", 0.8)) <= 1.0:
        raise bad("keep must be a fraction between 0 and 1")
    if kind == "llm":
        if not target:
            raise bad("no model path after 'llm:'")
        if "@http://" in target or "@https://" in target:
            raise bad("'MODEL@URL' is the 'openai:' form")
        return LLMSpec("hf", target, None, options)
    model, at, url = target.partition("@")
    if not model or (at and not re.match(r"https?://\S+$", url)):
        raise bad("expected 'openai:MODEL' or 'openai:MODEL@http(s)://HOST[:PORT]/v1'")
    return LLMSpec("openai", model, url or None, options)


def from_spec(spec: str, fallback: Recaptioner) -> LLMRecaptioner:
    """An LLMRecaptioner from a spec string (see the module docstring), falling back to `fallback` (the
    recaptioner its `fallback=NAME` option names, loaded by `pipeline.prompt.recaption`)."""
    s = parse_spec(spec)
    o = s.options
    kwargs: dict = {}
    for key in ("keep", "temperature", "timeout"):
        if key in o:
            kwargs[key] = float(o[key])
    for key, arg in (("max_tokens", "max_new_tokens"), ("retries", "max_retries")):
        if key in o:
            kwargs[arg] = int(o[key])
    if "system" in o:
        kwargs["system_prompt"] = Path(o["system"]).read_text()
        kwargs["examples"] = ()
    if "device" in o:
        kwargs["device"] = o["device"]
    if "key_env" in o:
        kwargs["api_key_env"] = o["key_env"]
    return LLMRecaptioner(s.backend, s.model, base_url=s.base_url, fallback=fallback, **kwargs)


# -- backends -----------------------------------------------------------------------------------------

def _fingerprint(folder: str) -> str:
    """Names, sizes and the first and last 64 KiB of every file: cheap, and independent of where it lives."""
    h = hashlib.sha256()
    root = Path(folder)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 16))
            if size > 1 << 17:
                f.seek(-(1 << 16), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()


class _HFBackend:
    def __init__(self, uri: str, device: str | None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from disk or a URI, never a hub
        import torch
        import transformers

        from models.interface import local_model_dir

        self.path = local_model_dir(uri, "recaptioner LLM")
        self.label = Path(uri.rstrip("/")).name or "model"
        self.fingerprint = _fingerprint(self.path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            dtype = "auto" if self.device.type == "cuda" else torch.float32
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                self.path, local_files_only=True, dtype=dtype).to(self.device).eval()
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
        self.torch = torch

    def prompt_text(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """The text to complete, and whether it came from the chat template (special tokens included)."""
        if getattr(self.tokenizer, "chat_template", None):
            try:
                return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True
            except Exception:  # e.g. templates that refuse a system turn: fold it into the first user turn
                folded = [dict(m) for m in messages if m["role"] != "system"]
                system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
                if folded and system:
                    folded[0]["content"] = f"{system}\n\n{folded[0]['content']}"
                return self.tokenizer.apply_chat_template(folded, add_generation_prompt=True, tokenize=False), True
        parts = []
        for m in messages:
            if m["role"] == "system":
                parts.append(m["content"] + "\n")
            elif m["role"] == "user":
                parts.append(f"Prompt: {m['content']}")
            else:
                parts.append(f"Caption: {m['content']}\n")
        return "\n".join(parts) + "\nCaption:", False

    def complete(self, messages: list[dict[str, str]], seed: int, temperature: float, max_new_tokens: int) -> str:
        torch = self.torch
        text, templated = self.prompt_text(messages)
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=not templated).to(self.device)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen = dict(max_new_tokens=max_new_tokens, pad_token_id=pad)
        if temperature > 0:
            gen.update(do_sample=True, temperature=temperature, top_p=0.95, top_k=0)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():  # the caller's RNG is untouched
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, **gen)
        return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class _OpenAIBackend:
    def __init__(self, model: str, base_url: str | None, api_key_env: str | None, timeout: float, max_retries: int):
        try:
            import openai
        except ImportError:
            raise ImportError("the 'openai:' recaptioner needs the openai client: "
                              "pip install 'reelforge[llm]'") from None
        env = api_key_env or "OPENAI_API_KEY"
        key = os.environ.get(env)
        if not key:
            if api_key_env:
                raise ValueError(f"recaptioner: environment variable {api_key_env} (the API key) is not set")
            if not base_url and not os.environ.get("OPENAI_BASE_URL"):
                raise ValueError("recaptioner: set OPENAI_API_KEY, or give a base URL: "
                                 "'openai:MODEL@http://HOST:PORT/v1'")
            key = "none"  # local OpenAI-compatible servers (vLLM, llama.cpp, Ollama) take any key
        self.model = model
        self.label = model
        self.fingerprint = model
        self.timeout = timeout
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)

    def complete(self, messages: list[dict[str, str]], seed: int, temperature: float, max_new_tokens: int) -> str:
        resp = self.client.chat.completions.create(
            model=self.model, messages=messages, seed=seed, temperature=temperature, max_tokens=max_new_tokens, n=1)
        if not resp.choices:
            return ""
        return resp.choices[0].message.content or ""


# -- the recaptioner ----------------------------------------------------------------------------------

class LLMRecaptioner:
    """Rewrites prompts with an LLM, falling back to `fallback` whenever the answer drops what the user
    said or the model fails; see the module docstring.

    Args:
        backend: "hf" (a transformers causal LM) or "openai" (an OpenAI-compatible chat endpoint).
        model: hf: a local folder or fsspec URI of the model and its tokenizer; openai: the model name.
        base_url: openai: the endpoint (e.g. "http://127.0.0.1:8000/v1"); None: the client's default.
        fallback: the recaptioner used when the answer is not kept (default: a PlainRecaptioner);
            `pipeline.prompt.recaption.load_recaptioner` loads one by name.
        system_prompt: the instructions that describe the caption style (default DEFAULT_SYSTEM_PROMPT).
        examples: (prompt, caption) pairs shown to the model as earlier turns (default DEFAULT_EXAMPLES).
        keep: the share of the prompt's content words a caption must keep to be used.
        temperature: sampling temperature, seeded by the clip's seed; 0 = greedy.
        max_new_tokens: most tokens generated per caption. max_chars: longest caption kept.
        device: hf: torch device (default cuda when available, else cpu).
        timeout, max_retries, api_key_env: openai: per-request timeout (s), client retries, and the
            environment variable holding the key (default OPENAI_API_KEY; a local endpoint needs none).
        cache_size: (prompt, seed) → caption answers kept, so a prompt repeated in a run is asked once.
    """

    def __init__(self, backend: str, model: str, *, base_url: str | None = None, fallback: Recaptioner | None = None,
                 system_prompt: str | None = None, examples: Sequence[tuple[str, str]] | None = None,
                 keep: float = 0.8, temperature: float = 0.7, max_new_tokens: int = 160, max_chars: int = 600,
                 device: str | None = None, timeout: float = 30.0, max_retries: int = 2,
                 api_key_env: str | None = None, cache_size: int = 1024):
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"keep={keep} must be between 0 and 1")
        if temperature < 0 or max_new_tokens < 1:
            raise ValueError("temperature must be >= 0 and max_new_tokens >= 1")
        self.fallback = PlainRecaptioner() if fallback is None else fallback
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.examples = tuple(DEFAULT_EXAMPLES if examples is None else examples)
        self.keep, self.temperature = keep, temperature
        self.max_new_tokens, self.max_chars = max_new_tokens, max_chars
        if backend == "hf":
            self.backend = _HFBackend(model, device)
        elif backend == "openai":
            self.backend = _OpenAIBackend(model, base_url, api_key_env, timeout, max_retries)
        else:
            raise ValueError(f"unknown LLM backend {backend!r}: 'hf' or 'openai'")
        self.kind = backend
        settings = repr((self.backend.fingerprint, self.system_prompt, self.examples, keep, temperature,
                         max_new_tokens, max_chars, self.fallback.name))
        digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", self.backend.label)
        self.name = f"llm-{VERSION}:{backend}:{label}:{digest}"
        self.last_source: str | None = None
        self.last_reason = ""
        self.stats = {"llm": 0, "fallback": 0}
        self._cache: OrderedDict[tuple[str, int, str], LLMCaption] = OrderedDict()
        self._cache_size = cache_size

    def messages(self, prompt: str, context: str = "") -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for user, caption in self.examples:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": caption}]
        if context:  # a storyboard's later shot: carry the subject and style over the cut
            prompt = (f"{prompt}\n\n(This is the next shot of one video. The previous shot's caption: {context} "
                      "Keep its subject, setting and style unless this prompt changes them.)")
        return msgs + [{"role": "user", "content": prompt}]

    def recaption_with_source(self, prompt: str, seed: int, context: str = "") -> LLMCaption:
        prompt = " ".join(prompt.split())
        if not prompt:
            raise ValueError("prompt is empty")
        key = (prompt, int(seed), context)
        if key in self._cache:
            self._cache.move_to_end(key)
            result = self._cache[key]
        else:
            result = self._ask(prompt, int(seed), context)
        self.last_source, self.last_reason = result.source, result.reason
        self.stats[result.source] += 1
        return result

    def recaption(self, prompt: str, seed: int, context: str = "") -> str:
        return self.recaption_with_source(prompt, seed, context).caption

    def _ask(self, prompt: str, seed: int, context: str = "") -> LLMCaption:
        t0 = time.perf_counter()
        raw = None
        try:
            raw = self.backend.complete(self.messages(prompt, context), seed, self.temperature, self.max_new_tokens)
            caption = clean_answer(raw, self.max_chars)
            reason = check_caption(prompt, caption, self.keep)
        except Exception as e:  # a failing model or endpoint must not fail the clip
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if not reason:
            result = LLMCaption(caption, "llm", "", raw)
            self._cache[(prompt, seed, context)] = result
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return result
        log.info("recaptioner %s: fallback to %s for %r after %.1fs (%s)", self.name, self.fallback.name,
                 prompt, time.perf_counter() - t0, reason)
        return LLMCaption(self.fallback.recaption(prompt, seed, context=context), "fallback", reason, raw)
