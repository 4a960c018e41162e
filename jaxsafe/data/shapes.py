"""Captioned shapes: the procedural 32×32 image–caption set of the miniature text-to-image test bed.

Real Stable Diffusion weights and LAION captions are out of reach offline, so concept erasure is
measured end to end on a small world whose every image is drawn from a label tuple
y = (shape, colour, background) ∈ SHAPES × COLOURS × BACKGROUNDS (4 × 4 × 3 = 48 tuples) and
captioned from a 16-word vocabulary, e.g. "a red circle on a striped background". It is built
for erasure studies: a synonym pair ("square" or "box", equally likely, for leakage), visually
near concepts (red / orange, circle / ellipse, for collateral damage) and partial captions (the
colour and the background phrase each left out with probability 0.15, so one-concept prompts
are in distribution); docs/testbed.md, "The world", lists the values and nuisances.

Everything is a pure function of ``(seed, index)`` through ``np.random.default_rng((seed,
index))``, so ``ShapesDataset(seed)[i]`` is random access and ``shapes_batches(...)[step]`` is
the batch of training step ``step`` on any number of hosts. Train and held-out splits are
different seeds (by convention 0 = train, 1 = held out). The ``"lightness"`` world (``world=``)
adds the plain backgrounds ``"black"`` and ``"white"``, grey levels 170..220 mapped onto 10..40
or 235..255, so that a caption pins the image's brightness (One More Step's test bed,
docs/oms.md); the grey world's streams, vocabulary and concepts are unchanged by it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_RGB",
    "CONCEPTS",
    "LIGHTNESS",
    "LIGHTNESS_LEVELS",
    "NEAR",
    "RESOLUTION",
    "SHAPES",
    "SYNONYMS",
    "VOCABULARY",
    "WORLDS",
    "ShapesDataset",
    "article",
    "caption",
    "concept_words",
    "example",
    "parse_caption",
    "render",
    "shapes_batches",
    "tokenizer",
]

RESOLUTION = 32
SHAPES = ("circle", "ellipse", "square", "triangle")
COLOURS = ("red", "orange", "green", "blue")
BACKGROUNDS = ("plain", "striped", "dotted")
ATTRIBUTES = (("shape", SHAPES), ("colour", COLOURS), ("background", BACKGROUNDS))
#: The lightness world's extra background values and the grey-level ranges they map onto.
LIGHTNESS = ("black", "white")
LIGHTNESS_LEVELS = {"black": (10.0, 40.0), "white": (235.0, 255.0)}
WORLDS = ("grey", "lightness")
GREY_LEVELS = (170.0, 220.0)  # the grey world's background level range (``_nuisance``)
#: Caption word -> the concept it denotes.
SYNONYMS = {"box": "square"}
#: Each concept's visually nearest other concept (collateral-damage probes).
NEAR = {"red": "orange", "orange": "red", "circle": "ellipse", "ellipse": "circle"}
#: Concept word (synonyms included) -> (attribute index, value index).
CONCEPTS = {w: (a, i) for a, (_, values) in enumerate(ATTRIBUTES) for i, w in enumerate(values)}
CONCEPTS.update({w: CONCEPTS[c] for w, c in SYNONYMS.items()})
VOCABULARY = ("a", "an", "on", "background") + SHAPES + tuple(SYNONYMS) + COLOURS + BACKGROUNDS

COLOUR_RGB = np.array([[210, 35, 35], [235, 130, 20], [40, 170, 60], [40, 80, 210]], np.float64)
P_MENTION_COLOUR = 0.85
P_MENTION_BACKGROUND = 0.85
P_SYNONYM = 0.5
SUPERSAMPLE = 4
PERIOD = 6.0  # stripe / dot lattice period in pixels


def _check_world(world: str) -> str:
    if world not in WORLDS:
        raise ValueError(f"world={world!r}; expected one of {WORLDS}")
    return world


def _backgrounds(world: str) -> tuple[str, ...]:
    return BACKGROUNDS + (LIGHTNESS if _check_world(world) == "lightness" else ())


def _check_label(label) -> tuple[int, int, int]:
    label = tuple(int(v) for v in np.asarray(label).reshape(-1))
    sizes = (len(SHAPES), len(COLOURS), len(BACKGROUNDS) + len(LIGHTNESS))
    if len(label) != 3 or not all(0 <= v < n for v, n in zip(label, sizes)):
        raise ValueError(
            f"label must be (shape, colour, background) indices below {sizes}, got {label}"
        )
    return label


def _shape_mask(shape: int, u, v, cx, cy, r, vertical: bool):
    """Inside-test of the shape on coordinates (u, v) (x right, y down), in pixels."""
    x, y = u - cx, v - cy
    if SHAPES[shape] == "circle":
        return x * x + y * y <= r * r
    if SHAPES[shape] == "ellipse":
        a, b = 1.15 * r, 0.6 * r
        if vertical:
            x, y = y, x
        return (x / a) ** 2 + (y / b) ** 2 <= 1.0
    if SHAPES[shape] == "square":
        s = 0.85 * r  # half side: the square's area is close to the circle's
        return (np.abs(x) <= s) & (np.abs(y) <= s)
    # Upward equilateral triangle of circumradius R, its bounding box centred on (cx, cy) (the
    # centroid lies R/4 below): three half-planes.
    R = 1.4 * r
    y = y - R / 4
    below_top_edges = np.sqrt(3.0) * np.abs(x) <= y + R
    return below_top_edges & (y <= R / 2)


def _background(kind: int, u, v, params) -> np.ndarray:
    level, dark, vertical_stripes, phase_u, phase_v = params
    name = _backgrounds("lightness")[kind]
    if name in LIGHTNESS:  # plain, its level mapped linearly from the grey range
        (g0, g1), (l0, l1) = GREY_LEVELS, LIGHTNESS_LEVELS[name]
        level, dark_here = l0 + (level - g0) * (l1 - l0) / (g1 - g0), np.zeros((), bool)
    elif name == "plain":
        dark_here = np.zeros((), bool)
    elif name == "striped":
        w = u if vertical_stripes else v
        dark_here = np.floor((w + phase_u) / (PERIOD / 2)) % 2 == 1
    else:
        du = (u + phase_u) % PERIOD - PERIOD / 2
        dv = (v + phase_v) % PERIOD - PERIOD / 2
        dark_here = du * du + dv * dv <= 1.2**2
    return np.broadcast_to(np.where(dark_here, level - dark, level), np.broadcast(u, v).shape)


def _nuisance(rng: np.random.Generator) -> dict:
    """The continuous latent factors of one image, drawn in a fixed order (determinism)."""
    return dict(
        centre=rng.uniform(12.0, 20.0, 2),
        r=rng.uniform(6.5, 9.0),
        vertical=bool(rng.random() < 0.5),
        rgb_jitter=rng.uniform(-10.0, 10.0, 3),
        bg=(
            rng.uniform(*GREY_LEVELS),
            rng.uniform(70.0, 100.0),
            bool(rng.random() < 0.5),
            rng.uniform(0.0, PERIOD),
            rng.uniform(0.0, PERIOD),
        ),
    )


def render(label, nuisance: dict, resolution: int = RESOLUTION) -> np.ndarray:
    """The uint8 (resolution, resolution, 3) image of ``label`` with the given nuisances."""
    shape, colour, background = _check_label(label)
    n = resolution * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / SUPERSAMPLE * (RESOLUTION / resolution)
    u, v = c[None, :], c[:, None]
    bg = _background(background, u, v, nuisance["bg"])
    inside = _shape_mask(shape, u, v, *nuisance["centre"], nuisance["r"], nuisance["vertical"])
    rgb = np.clip(COLOUR_RGB[colour] + nuisance["rgb_jitter"], 0, 255)

    # Box-filtering the supersampled composite is linear: filter coverage and background apart.
    def box(a):
        return a.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean((1, 3))

    cover, bg = box(inside.astype(np.float64))[..., None], box(bg)[..., None]
    return np.clip(np.rint(bg * (1 - cover) + rgb * cover), 0, 255).astype(np.uint8)


def article(word: str) -> str:
    """The indefinite article before ``word``: "an" before a vowel, else "a" (the one a/an rule
    of the test bed's captions and prompts)."""
    return "an" if word[:1].lower() in tuple("aeiou") else "a"


def caption(
    label,
    rng: np.random.Generator,
    *,
    mention_colour: bool | None = None,
    mention_background: bool | None = None,
) -> str:
    """A caption of ``label``: "a [colour] shape [on a background background]".

    Unset ``mention_*`` are drawn from ``rng`` (probability 0.85 each); "square" becomes "box"
    with probability 0.5. The article is "an" before a vowel, as in English.
    """
    shape, colour, background = _check_label(label)
    if mention_colour is None:
        mention_colour = bool(rng.random() < P_MENTION_COLOUR)
    if mention_background is None:
        mention_background = bool(rng.random() < P_MENTION_BACKGROUND)
    noun = SHAPES[shape]
    if rng.random() < P_SYNONYM:
        noun = next((w for w, c in SYNONYMS.items() if c == noun), noun)
    words = ([COLOURS[colour]] if mention_colour else []) + [noun]
    words = [article(words[0])] + words
    if mention_background:
        words += ["on", "a", _backgrounds("lightness")[background], "background"]
    return " ".join(words)


def parse_caption(text: str) -> tuple[int, int, int]:
    """(shape, colour, background) indices a caption names, -1 for an attribute it leaves out.

    Raises ValueError for a word outside VOCABULARY (+ LIGHTNESS) or two values of one attribute.
    """
    out = [-1, -1, -1]
    for word in text.lower().split():
        if word not in VOCABULARY + LIGHTNESS:
            raise ValueError(
                f"caption {text!r}: unknown word {word!r}; vocabulary: "
                f"{', '.join(VOCABULARY + LIGHTNESS)}"
            )
        if word in CONCEPTS or word in LIGHTNESS:
            a, i = CONCEPTS.get(word) or (2, len(BACKGROUNDS) + LIGHTNESS.index(word))
            if out[a] not in (-1, i):
                raise ValueError(
                    f"caption {text!r} names two values of attribute {ATTRIBUTES[a][0]!r}"
                )
            out[a] = i
    return tuple(out)


def concept_words(attribute: str | None = None) -> tuple[str, ...]:
    """All concept words (synonyms included), optionally of one attribute."""
    names = [a for a, _ in ATTRIBUTES]
    if attribute is not None and attribute not in names:
        raise ValueError(f"attribute={attribute!r}; expected one of {names}")
    return tuple(w for w, (a, _) in CONCEPTS.items() if attribute is None or names[a] == attribute)


def _probabilities(weights, names: tuple[str, ...], what: str) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.shape != (len(names),) or not np.all(w >= 0) or not w.sum() > 0:
        raise ValueError(
            f"{what}_weights must be {len(names)} non-negative numbers (one per "
            f"{what} of {names}) with a positive sum, got {weights!r}"
        )
    return w / w.sum()


def _shape_probabilities(shape_weights) -> np.ndarray | None:
    return _probabilities(shape_weights, SHAPES, "shape")


def example(
    seed: int, index: int, shape_weights=None, world: str = "grey", colour_weights=None
) -> dict:
    """Example ``index`` of the stream ``seed``: ``{'image': uint8 (32, 32, 3), 'label': int32
    (3,), 'caption': str}``. ``shape_weights`` / ``colour_weights`` (one per shape / colour,
    default uniform) rebalance those draws, a zero weight leaves the value out (a model trained
    without a concept); the uniform stream is unchanged by their existence.
    ``world="lightness"`` draws the background from 5 values (module docstring)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng((int(seed), int(index)))
    probs = (
        _shape_probabilities(shape_weights),
        _probabilities(colour_weights, COLOURS, "colour"),
        None,
    )
    sizes = (len(SHAPES), len(COLOURS), len(_backgrounds(world)))
    label = tuple(
        int(rng.integers(n)) if p is None else int(rng.choice(n, p=p)) for p, n in zip(probs, sizes)
    )
    nuisance = _nuisance(rng)
    text = caption(label, rng)
    return {"image": render(label, nuisance), "label": np.asarray(label, np.int32), "caption": text}


class ShapesDataset(Sequence):
    """The first ``num_examples`` examples of stream ``seed`` (random access, nothing stored),
    optionally with ``shape_weights``, ``colour_weights`` and ``world`` (see :func:`example`)."""

    def __init__(
        self,
        seed: int = 0,
        num_examples: int = 2**31 - 1,
        shape_weights=None,
        world: str = "grey",
        colour_weights=None,
    ):
        if num_examples < 1:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        _shape_probabilities(shape_weights)  # fail at construction, not at the first item
        self.seed, self.num_examples = int(seed), int(num_examples)
        self.shape_weights = None if shape_weights is None else tuple(map(float, shape_weights))
        self.world = _check_world(world)
        _probabilities(colour_weights, COLOURS, "colour")
        self.colour_weights = None if colour_weights is None else tuple(map(float, colour_weights))

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        return example(
            self.seed, i % len(self), self.shape_weights, self.world, self.colour_weights
        )

    def arrays(self, start: int, count: int) -> dict:
        """Examples ``start .. start + count - 1`` stacked: image (n, 32, 32, 3) uint8, label
        (n, 3) int32, caption list of str."""
        items = [self[i] for i in range(start, start + count)]
        return {
            "image": np.stack([e["image"] for e in items]),
            "label": np.stack([e["label"] for e in items]),
            "caption": [e["caption"] for e in items],
        }


def shapes_batches(
    dataset: ShapesDataset,
    tokenizer,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
):
    """Infinite ``grain.MapDataset``: item ``step`` = ``{'image': float32 (b, 32, 32, 3) in
    [-1, 1], 'input_ids': int32 (b, L), 'label': int32 (b, 3)}``, ``b = batch_size //
    process_count``.

    Step ``s`` holds examples ``s·B .. (s+1)·B − 1`` (mod ``len(dataset)``) of the global batch
    ``B = batch_size``; process ``p`` keeps rows ``[p·b, (p+1)·b)``. The examples are i.i.d.
    draws already, so no shuffle is needed, and ``ds[step]`` is the same on resume.
    """
    import grain

    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
        )
    if batch_size % process_count:
        raise ValueError(
            f"global batch_size={batch_size} must be divisible by process_count={process_count}"
        )
    local = batch_size // process_count

    def load(step):
        first = int(step) * batch_size + process_index * local
        rows = [dataset[(first + j) % len(dataset)] for j in range(local)]
        return {
            "image": np.stack([e["image"] for e in rows]).astype(np.float32) / 127.5 - 1.0,
            "input_ids": tokenizer([e["caption"] for e in rows]),
            "label": np.stack([e["label"] for e in rows]),
        }

    return grain.MapDataset.range(2**62).map(load)


def tokenizer(max_length: int = 12, world: str = "grey"):
    """The test bed's :class:`~jaxsafe.data.word_tokenizer.WordTokenizer` over VOCABULARY, plus
    LIGHTNESS in the lightness world (the longest caption is 7 words; 12 leaves room for longer
    attack / erasure prompts)."""
    from jaxsafe.data.word_tokenizer import WordTokenizer

    return WordTokenizer(
        VOCABULARY + (LIGHTNESS if _check_world(world) == "lightness" else ()), max_length
    )
