"""The shapes world's recaptioner: a free-form user prompt → the canonical caption the default
model was trained on (docs/SHAPES_WORLD.md), registered as "shapes" in `pipeline.prompt.recaption`."""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from dataclasses import dataclass, field

import numpy as np

from models.shapes import lexicon as lx
from models.shapes.world import ATTRIBUTES, BACKGROUNDS, COLOURS, HELD_OUT, MOTIONS, SHAPES, Scene, canonical_caption

log = logging.getLogger(__name__)


# Words that carry no attribute: never corrected as typos, never looked up by embedding.
_FILLER = frozenset("""
a an the of and or with while as is are was were be being been it its it's this that which who there
here then than very so too really quite just also only again please make create generate render draw
show shows showing video clip animation movie film i want wanted me my we us you your for at by in
out around about frame frames image picture gif some any all each every two three both side edge
middle center centre corner way moment second seconds time through along slowly quickly fast slow
smoothly gently steadily gradually little tiny small big large huge giant medium sized size cute
nice pretty beautiful simple minimal minimalist minimalistic cinematic glowing shiny that's whose
where when how what like looking look looks seen appears appear appearing keeps keep kept getting
gets get got becomes become becoming turns turning turn does do doing did can could should would
will may might let lets 4k 8k hd hq high quality realistic style styled rendered shot view move
moves moving moved motion goes go going went travel travels traveling travelling travelled traveled
slide slides sliding slid drift drifts drifting drifted roll rolls rolling rolled bounce bounces
bouncing bounced head heads heading headed glide glides gliding glided fly flies flying flew float
floats floating floated run runs running ran cross crosses crossing crossed pass passes passing
passed shift shifts shifting shifted scoot scoots scooting zip zips zipping sweep sweeps sweeping
race races racing hop hops hopping jump jumps jumping wander wanders wandering cruise cruises
cruising creep creeps creeping enter enters entering exit exits exiting leave leaves leaving edges
direction sides perfectly completely totally entirely almost mostly colour color colours colors
coloured colored hue tint position located placed positioned start starts starting started begin begins
""".split())
# A direction after these (skipping 'the', 'top', ...) is a position, not a motion: "on the left".
_POSITION_WORDS = frozenset({"on", "at", "in", "near", "by", "within"})
_POSITION_SKIP = frozenset({"the", "a", "top", "bottom", "upper", "lower", "far", "very", "left", "right",
                            "hand", "side"})

_CLAUSE_BREAKS = frozenset({",", ".", ";", ":", "!", "?", "(", ")", "while", "as", "whereas", "but", "and", "then"})
_SKIP_IN_PHRASE = frozenset({"the", "a", "an", "side", "edge", "of", "frame", "screen", "image", "canvas",
                             "picture", "view", "far", "very", "way", "all"})


@dataclass
class _Item:
    words: tuple[str, ...]
    entry: lx.Entry | None          # None: a word with no attribute meaning (or punctuation)
    source: str = "lexicon"         # lexicon | embedding | typo | none
    used: bool = False

    @property
    def kind(self) -> str:
        if self.entry is None:
            return "punct" if self.words[0] in _CLAUSE_BREAKS and not self.words[0].isalpha() else "word"
        return self.entry.kind

    @property
    def text(self) -> str:
        return " ".join(self.words)


@dataclass
class ParsedPrompt:
    """What a prompt says about each attribute (None: left open), and how it was read."""

    shape: str | None = None
    colour: str | None = None
    background: str | None = None
    motion: str | None = None
    notes: list[str] = field(default_factory=list)      # approximations, conflicts, ignored words
    sources: dict[str, str] = field(default_factory=dict)  # attribute -> the words it came from

    def given(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES if getattr(self, a) is not None}


class ShapesRecaptioner:
    """Free-form prompt -> the shapes world's canonical caption (docs/SHAPES_WORLD.md).

    Reading a prompt:
      1. lower-case, split into words and punctuation; a word that neither the lexicon
         (`models.shapes.lexicon.LEXICON`) nor the text encoder's tokenizer knows is taken as a
         typo of the closest lexicon word when one is close enough ("grean" -> green);
      2. phrases are matched against the lexicon, longest first ("navy blue", "from ... to",
         "gets smaller", "rotated square"); every other content word is looked up in the embedding
         index (MiniLM, `shapes_lexicon.vocabulary_index`) and takes the meaning of its nearest
         lexicon phrase when the similarity reaches `shapes_lexicon.EMBEDDING_THRESHOLD`;
      3. clauses about the camera are set aside (the world's camera is always static);
      4. motion: "from X (to Y)" first, then "to/toward the X", then the first motion word;
      5. colours: each colour phrase is the background when a background noun follows it
         ("dark blue backdrop") or a background preposition precedes it ("on black", "against
         navy") and no object noun follows; the object's colour when an object noun follows; an
         undecided phrase fills the object's colour first, then the background;
      6. shape: the first shape word; else an unknown noun right after the object's colour is read
         as its nearest shape (noted as an approximation).

    Policy for what the world cannot show:
      * an attribute the prompt leaves open is filled by a choice seeded by (prompt, seed), which
        avoids the held-out colour-shape pairs;
      * an attribute the prompt gives with a value the world lacks ("pink", "star", "white
        background", "spinning") takes the nearest value of the world — never a random one — and
        the approximation is written to `ParsedPrompt.notes` and logged, so it is not silent;
      * conflicting values (two colours for one object) keep the first and note the rest;
      * details with no attribute ("cinematic", "slowly", "4k") leave the caption canonical; the
        pipeline keeps the original prompt beside the caption, so nothing the user said is lost.
    """

    name = "shapes-1"

    def __init__(self, *, embeddings: bool = True):
        self.embeddings = embeddings
        self.known_words = lx.tokenizer_vocabulary()
        self._single = sorted(w for w in lx.LEXICON_WORDS if len(w) >= 3)

    @property
    def index(self) -> lx.VocabularyIndex | None:
        """The MiniLM vocabulary index (None: embeddings off), built on the first word the lexicon
        lacks: most prompts never need it, and building it costs ~5 CPU s (torch, transformers, the
        lexicon's embeddings) in every process that recaptions, the start of a render among them."""
        return lx.vocabulary_index() if self.embeddings else None

    # -- public ---------------------------------------------------------------------------------
    def recaption(self, prompt: str, seed: int, context: str = "") -> str:
        return canonical_caption(self.scene(prompt, seed, context))

    def scene(self, prompt: str, seed: int, context: str = "") -> Scene:
        """The prompt's scene; what it leaves open comes from `context` (another caption, e.g. the
        previous shot's) when that says it, else from the seeded choice."""
        parsed = self.parse(prompt)
        for note in parsed.notes:
            log.info("recaption %r: %s", prompt, note)
        if context:
            before = self.parse(context)
            for attribute in ATTRIBUTES:
                if getattr(parsed, attribute) is None:
                    setattr(parsed, attribute, getattr(before, attribute))
        return self.fill(parsed, prompt, seed)

    def parse(self, prompt: str) -> ParsedPrompt:
        if not prompt or not prompt.strip():
            raise ValueError("prompt is empty")
        out = ParsedPrompt()
        items = self._items(prompt, out)
        self._drop_camera(items, out)
        self._motion(items, out)
        self._shape(items, out, self._colours(items, out))
        return out

    @staticmethod
    def fill(parsed: ParsedPrompt, prompt: str, seed: int) -> Scene:
        """The scene: the parsed values, and a seeded choice for each attribute left open."""
        digest = hashlib.sha256(f"{int(seed)}\x00{prompt}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        shape, colour = parsed.shape, parsed.colour
        if shape is None and colour is None:
            pairs = [(c, s) for s in SHAPES for c in COLOURS if (c, s) not in HELD_OUT]
            colour, shape = pairs[int(rng.integers(len(pairs)))]
        elif shape is None:
            options = [s for s in SHAPES if (colour, s) not in HELD_OUT]
            shape = options[int(rng.integers(len(options)))]
        elif colour is None:
            options = [c for c in COLOURS if (c, shape) not in HELD_OUT]
            colour = options[int(rng.integers(len(options)))]
        background = parsed.background or tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        motion = parsed.motion or MOTIONS[int(rng.integers(len(MOTIONS)))]
        return Scene(shape, colour, background, motion)

    # -- reading --------------------------------------------------------------------------------
    def _correct(self, word: str) -> str | None:
        """The lexicon word that `word` misspells, if it is one."""
        if word in lx.LEXICON_WORDS or word in _FILLER or not word.isalpha() or len(word) < 3:
            return None
        for suffix in ("s", "es", "ish"):      # plural / -ish of a listed word
            stem = word[: -len(suffix)]
            if word.endswith(suffix) and (stem,) in lx.LEXICON:
                return stem
        if word in self.known_words:            # a real English word: not a typo
            return None
        match = difflib.get_close_matches(word, self._single, n=1, cutoff=0.8)
        return match[0] if match else None

    def _items(self, prompt: str, out: ParsedPrompt) -> list[_Item]:
        text = prompt.lower().replace("\u2019", "'")
        text = re.sub(r"[-_/+&|*~]", " ", text)
        words = re.findall(r"[a-z0-9']+|[,.;:!?()]", text)
        fixed = []
        for w in words:
            c = self._correct(w)
            if c is not None and c != w:
                if not (w.endswith(("s", "es", "ish")) and w.startswith(c)):
                    out.notes.append(f"read {w!r} as {c!r}")
                fixed.append((c, "typo"))
            else:
                fixed.append((w, "lexicon"))
        items: list[_Item] = []
        i = 0
        while i < len(fixed):
            for n in range(min(lx.MAX_PHRASE, len(fixed) - i), 0, -1):
                phrase = tuple(w for w, _ in fixed[i:i + n])
                entry = lx.LEXICON.get(phrase)
                if entry is not None:
                    src = "typo" if any(s == "typo" for _, s in fixed[i:i + n]) else "lexicon"
                    items.append(_Item(phrase, entry, src))
                    i += n
                    break
            else:
                w = fixed[i][0]
                entry = None
                if self.embeddings and w.isalpha() and len(w) >= 3 and w not in _FILLER:
                    entry = self.index.lookup(w)
                items.append(_Item((w,), entry, "embedding" if entry else "none"))
                i += 1
        return items

    @staticmethod
    def _clauses(items: list[_Item]) -> list[list[int]]:
        clauses, cur = [], []
        for k, it in enumerate(items):
            if it.entry is None and it.words[0] in _CLAUSE_BREAKS:
                if cur:
                    clauses.append(cur)
                cur = []
            else:
                cur.append(k)
        if cur:
            clauses.append(cur)
        return clauses

    def _drop_camera(self, items: list[_Item], out: ParsedPrompt) -> None:
        """Set aside what a clause says about the camera: the world's camera is static."""
        for clause in self._clauses(items):
            cams = [k for k in clause if items[k].kind == "camera"]
            if not cams:
                continue
            has_object = any(items[k].kind in ("shape", "object") for k in clause)
            for k in clause:
                near = any(abs(k - c) <= 3 for c in cams)
                if items[k].kind in ("motion", "direction", "edge", "from", "to") and (near or not has_object):
                    if items[k].kind in ("motion", "direction") and items[k].entry.value != "still":
                        out.notes.append(f"camera motion {items[k].text!r} ignored: the camera is static")
                    items[k].used = True
                    items[k].entry = None

    # -- attributes -----------------------------------------------------------------------------
    @staticmethod
    def _direction_after(items: list[_Item], k: int, clause_end: int) -> tuple[int, str] | None:
        """The direction named within a few words after item k (skipping 'the', 'side', ...)."""
        j, skipped = k + 1, 0
        while j < clause_end and skipped <= 3:
            it = items[j]
            if it.kind in ("direction", "edge"):
                return j, it.entry.value
            if it.kind == "word" and it.words[0] in _SKIP_IN_PHRASE:
                skipped += 1
                j += 1
                continue
            return None
        return None

    @staticmethod
    def _is_position(items: list[_Item], k: int) -> bool:
        """Whether the direction at item k names a place ("on the left", "in the top left corner")."""
        j = k - 1
        while j >= 0 and items[j].words[0] in _POSITION_SKIP:
            j -= 1
        return j >= 0 and items[j].words[0] in _POSITION_WORDS

    def _motion(self, items: list[_Item], out: ParsedPrompt) -> None:
        found: list[tuple[int, str, str, bool]] = []   # (rank, value, words, exact)
        for clause in self._clauses(items):
            end = clause[-1] + 1
            for k in clause:
                it = items[k]
                if it.kind == "from":
                    src = self._direction_after(items, k, end)
                    if src is None:
                        continue
                    dst = None
                    for t in range(src[0] + 1, end):
                        if items[t].kind == "to":
                            dst = self._direction_after(items, t, end)
                            if dst is not None:
                                break
                    if dst is not None:
                        found.append((0, dst[1], " ".join(i.text for i in items[k:dst[0] + 1]), True))
                        for t in range(k, dst[0] + 1):
                            items[t].used = True
                    else:
                        found.append((0, lx.OPPOSITE[src[1]], f"from ... {items[src[0]].text}", True))
                        items[k].used = items[src[0]].used = True
            for k in clause:
                if items[k].kind == "to" and not items[k].used:
                    dst = self._direction_after(items, k, end)
                    if dst is not None:
                        found.append((1, dst[1], f"{items[k].text} ... {items[dst[0]].text}", True))
                        items[k].used = items[dst[0]].used = True
        for k, it in enumerate(items):
            if it.used:
                continue
            if it.kind == "motion":
                found.append((2, it.entry.value, it.text, it.entry.exact))
                it.used = True
            elif it.kind == "direction" and not self._is_position(items, k):
                found.append((2, it.entry.value, it.text, True))
                it.used = True
        if not found:
            return
        best = min(found, key=lambda f: f[0])   # stable: the first of the best rank
        out.motion = best[1]
        out.sources["motion"] = best[2]
        if not best[3]:
            out.notes.append(f"motion {best[2]!r} is not in the world: nearest is {best[1]!r}")
        others = {f[1] for f in found} - {best[1]}
        if others:
            out.notes.append(f"motion: kept {best[1]!r}, ignored {sorted(others)}")

    def _colour_value(self, phrase: list[_Item], role: str) -> tuple[str, bool]:
        families = [it.entry.value for it in phrase if it.kind == "colour"]
        mods = {it.entry.value for it in phrase if it.kind == "modifier"} | {f for f in families if f == "navy"}
        darkened = bool(mods & set(lx.DARKENING)) or "navy" in families
        if role == "object":
            native = [f for f in families if f in COLOURS]
            if native:
                return native[-1], True
            return lx.FAMILY_TO_OBJECT[families[0]]
        native = [f for f in families if f in BACKGROUNDS]
        if native:
            return native[-1], True
        if not families:
            return "black", True                 # "dark background"
        if darkened and families[-1] in ("blue", "purple"):
            return "navy", True                  # dark blue, deep blue, midnight purple
        return lx.FAMILY_TO_BACKGROUND[families[-1]]

    def _colours(self, items: list[_Item], out: ParsedPrompt) -> int | None:
        """Sets the object's colour and the background; returns the index of the item right after
        the object's colour phrase (where its noun is expected)."""
        # Colour phrases: runs of colour words and modifiers with at least one colour word, or a
        # darkening modifier on its own right before a background noun ("dark background").
        phrases: list[tuple[int, int]] = []
        k = 0
        while k < len(items):
            if items[k].kind in ("colour", "modifier") and not items[k].used:
                j = k
                while j < len(items) and items[j].kind in ("colour", "modifier") and not items[j].used:
                    j += 1
                run = items[k:j]
                if any(it.kind == "colour" for it in run):
                    phrases.append((k, j))
                elif (j < len(items) and items[j].kind == "bgnoun"
                      and any(it.entry.value in lx.DARKENING for it in run)):
                    phrases.append((k, j))
                k = j
            else:
                k += 1

        def next_kind(j: int) -> str:
            while j < len(items) and items[j].kind == "word" and items[j].words[0] in _FILLER \
                    and items[j].words[0] not in _CLAUSE_BREAKS:
                j += 1
            return items[j].kind if j < len(items) else "end"

        def prev_kind(k: int) -> str:
            j = k - 1
            while j >= 0 and items[j].kind in ("word", "punct") and items[j].words[0] in (
                    "a", "an", "the", "plain", "solid", "is", "of", "color", "colour", ":", "="):
                j -= 1
            return items[j].kind if j >= 0 else "start"

        roles = []
        for a, b in phrases:
            nk, pk = next_kind(b), prev_kind(a)
            if nk == "bgnoun":
                role = "background"
            elif nk in ("shape", "object"):
                role = "object"
            elif pk in ("bgprep", "bgnoun"):
                role = "background"
            else:
                role = None
            roles.append(role)
        if any(r is None for r in roles):
            has_obj = "object" in roles
            has_bg = "background" in roles
            for n, r in enumerate(roles):
                if r is None:
                    if not has_obj:
                        roles[n] = "object"
                        has_obj = True
                    elif not has_bg:
                        roles[n] = "background"
                        has_bg = True
        object_noun = None
        for (a, b), role in zip(phrases, roles):
            words = " ".join(it.text for it in items[a:b])
            if role is None:
                out.notes.append(f"colour {words!r} ignored: the object and the background have theirs")
                continue
            value, exact = self._colour_value(items[a:b], role)
            attr = "colour" if role == "object" else "background"
            if getattr(out, attr) is None:
                setattr(out, attr, value)
                out.sources[attr] = words
                if not exact:
                    out.notes.append(f"{attr} {words!r} is not in the world: nearest is {value!r}")
                if role == "object" and object_noun is None:
                    object_noun = b
            elif getattr(out, attr) != value:
                out.notes.append(f"{attr}: kept {getattr(out, attr)!r}, ignored {words!r}")
        return object_noun

    def _shape(self, items: list[_Item], out: ParsedPrompt, object_noun: int | None) -> None:
        shapes = [it for it in items if it.kind == "shape"]
        if shapes:
            first = shapes[0]
            out.shape = first.entry.value
            out.sources["shape"] = first.text
            if not first.entry.exact:
                out.notes.append(f"shape {first.text!r} is not in the world: nearest is {out.shape!r}")
            others = {it.entry.value for it in shapes} - {out.shape}
            if others:
                out.notes.append(f"shape: kept {out.shape!r}, ignored {sorted(others)}")
            return
        k = object_noun
        if k is None or k >= len(items) or not self.embeddings:
            return
        it = items[k]
        w = it.words[0]
        if it.kind == "word" and w.isalpha() and len(w) >= 3 and w not in _FILLER:
            sims = self.index.matrix @ self.index.embed([w])[0]
            shape_rows = [n for n, e in enumerate(self.index.entries) if e.kind == "shape"]
            best = max(shape_rows, key=lambda n: sims[n])
            out.shape = self.index.entries[best].value
            out.sources["shape"] = w
            out.notes.append(f"shape {w!r} is not in the world: nearest is {out.shape!r}")
