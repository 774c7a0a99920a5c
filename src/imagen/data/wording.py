"""The words people type for Shapes captions: paraphrases of the grammar, and their parser.

The Shapes grammar (``a red circle on the left``, ``a red circle above a blue square``; see
:mod:`imagen.data.shapes`) names each colour, shape, place and relation one way. People type
synonyms (``crimson``, ``ball``), other places and relations (``to the right``, ``beneath``),
other word orders (``on the left, a red circle``), prefixes (``there is``, ``an image of``),
no articles, capitals and punctuation, and for two objects coordinated clauses (``a red circle
and a green square to its right``). :func:`paraphrase` draws such a caption for a parsed
scene; :func:`parse_wording` reads every one of them back to the same :class:`ParsedCaption`.

The wording comes in parts: :data:`SEEN` may be used in training, and with it :data:`MORE`
where a config asks for the broad lexicon (:data:`LEXICONS`, ``data.shapes.wording``);
:data:`HELDOUT` never is (evaluation only), so an evaluation on it measures how far the text
encoder carries what training taught. Every held-out phrasing has at least one word no seen
phrasing of any lexicon has (:data:`HELDOUT_WORDS`), so a training caption can be checked for
it word by word.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParsedCaption:
    """A caption of the Shapes grammar: one object with a place, or two with a relation."""

    objects: tuple[tuple[str, str], ...]  # (color, shape) per named object
    place: str | None = None
    relation: str | None = None

    @property
    def kind(self) -> str:
        return "one" if len(self.objects) == 1 else "two"

    def canonical(self) -> ParsedCaption:
        """The same meaning with the relation ``above`` or ``left of`` ("b below a" is "a
        above b"), so that two captions of one scene compare equal."""
        if self.relation in ("below", "right of"):
            return ParsedCaption(self.objects[::-1], relation=INVERSE[self.relation])
        return self


Table = dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Wording:
    """One part of the paraphrase lexicon. Each table maps a grammar word (colour, shape, place,
    relation) to its phrasings. ``relations`` read ``A REL B``; ``relations_it`` read ``B and
    A REL_IT`` (A is REL of B, "it" being B). Templates: ``{obj} {place}`` (one object),
    ``{a} {rel} {b}`` (two), ``{b} ... {a} {relit}`` (clauses: ``{a}`` is ``{relit}`` of ``{b}``).
    ``prefixes`` go before a template that starts with an object."""

    colors: Table
    shapes: Table
    places: Table
    relations: Table
    relations_it: Table
    one_templates: tuple[str, ...]
    two_templates: tuple[str, ...]
    clause_templates: tuple[str, ...]
    prefixes: tuple[str, ...]


SEEN = Wording(
    colors={
        "red": ("red", "crimson", "scarlet", "cherry"),
        "green": ("green", "emerald", "lime"),
        "blue": ("blue", "navy", "azure", "royal blue"),
        "yellow": ("yellow", "golden", "lemon"),
        "white": ("white", "ivory", "snowy"),
        "purple": ("purple", "violet", "lilac"),
    },
    shapes={
        "circle": ("circle", "ball", "disc", "dot", "round shape"),
        "square": ("square", "box", "block", "square shape"),
        "triangle": ("triangle", "pyramid", "wedge"),
    },
    places={
        "on the left": ("on the left", "to the left", "on the left side", "at the left"),
        "on the right": ("on the right", "to the right", "on the right side", "at the right"),
        "at the top": ("at the top", "near the top", "up top", "at the top of the image"),
        "at the bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
        "in the center": ("in the center", "in the centre", "in the middle", "at the center"),
    },
    relations={
        "above": ("above", "over", "on top of", "higher than"),
        "below": ("below", "under", "beneath", "underneath", "lower than"),
        "left of": ("left of", "to the left of", "on the left of"),
        "right of": ("right of", "to the right of", "on the right of"),
    },
    relations_it={
        "above": ("above it", "over it", "on top of it"),
        "below": ("below it", "under it", "beneath it"),
        "left of": ("to its left", "on its left", "to the left of it"),
        "right of": ("to its right", "on its right", "to the right of it"),
    },
    one_templates=("{obj} {place}", "{place}, {obj}", "{place} there is {obj}"),
    two_templates=("{a} {rel} {b}", "{rel} {b}, {a}", "{rel} {b} there is {a}"),
    clause_templates=(
        "{b} and {a} {relit}",
        "{b} and, {relit}, {a}",
        "{b} with {a} {relit}",
        "{b}; {relit}, {a}",
    ),
    prefixes=("there is ", "there's ", "an image of ", "a picture of ", "a photo of ", "here is "),
)

MORE = Wording(
    colors={
        "red": ("ruby", "bright red", "dark red", "tomato red"),
        "green": ("jade", "bright green", "dark green", "grass green"),
        "blue": ("cobalt", "sapphire", "light blue", "dark blue"),
        "yellow": ("amber", "mustard", "bright yellow", "canary yellow"),
        "white": ("cream", "pearl", "pure white", "milky white"),
        "purple": ("plum", "mauve", "amethyst", "dark purple"),
    },
    shapes={
        "circle": ("sphere", "globe", "circular shape", "round dot"),
        "square": ("cube", "crate", "brick", "squared shape"),
        "triangle": ("cone", "arrowhead", "triangle shape", "three-sided shape"),
    },
    places={
        "on the left": ("toward the left", "in the left half", "over on the left"),
        "on the right": ("toward the right", "in the right half", "over on the right"),
        "at the top": ("high up", "in the top half", "in the upper part"),
        "at the bottom": ("down low", "in the bottom half", "in the lower part"),
        "in the center": ("in the central part", "in the centre of the image", "centred"),
    },
    relations={
        "above": ("higher up than", "up above", "atop"),
        "below": ("lower down than", "down below", "lower down from"),
        "left of": ("more to the left than", "on the left side of", "leftward of"),
        "right of": ("more to the right than", "on the right side of", "rightward of"),
    },
    relations_it={
        "above": ("higher up", "up above it", "atop it"),
        "below": ("lower down", "down below it", "underneath it"),
        "left of": ("more to the left", "on the left side of it", "leftward of it"),
        "right of": ("more to the right", "on the right side of it", "rightward of it"),
    },
    one_templates=("{obj} placed {place}", "{obj} shown {place}", "{place} we see {obj}"),
    two_templates=("{a} placed {rel} {b}", "{a} shown {rel} {b}", "{rel} {b} we see {a}"),
    clause_templates=(
        "{b}, along with {a} {relit}",
        "{b} plus {a} {relit}",
        "{b} as well as {a} {relit}",
    ),
    prefixes=(
        "a painting of ",
        "an illustration of ",
        "a rendering of ",
        "a diagram of ",
        "an image showing ",
        "a picture with ",
    ),
)

HELDOUT = Wording(
    colors={
        "red": ("rose",),
        "green": ("forest green",),
        "blue": ("sky blue",),
        "yellow": ("gold",),
        "white": ("snow white",),
        "purple": ("lavender",),
    },
    shapes={"circle": ("orb",), "square": ("tile",), "triangle": ("triangular shape",)},
    places={
        "on the left": ("on the left-hand side",),
        "on the right": ("on the right-hand side",),
        "at the top": ("near the top edge",),
        "at the bottom": ("near the bottom edge",),
        "in the center": ("in the very middle",),
    },
    relations={
        "above": ("further up than",),
        "below": ("further down than",),
        "left of": ("further left than",),
        "right of": ("further right than",),
    },
    relations_it={
        "above": ("further up",),
        "below": ("further down",),
        "left of": ("further left",),
        "right of": ("further right",),
    },
    one_templates=("{obj} sitting {place}",),
    two_templates=("{a} sitting {rel} {b}",),
    clause_templates=("{b}, together with {a} {relit}",),
    prefixes=("a drawing of ", "a sketch of "),
)

ARTICLES = ("a ", "one ", "the ", "")  # "a" becomes "an" before a vowel
PUNCTUATION = ("", ".", "!")
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def phrases(wording: Wording) -> list[str]:
    """Every phrase of ``wording``: table entries, templates (without their slots), prefixes."""
    tables = (wording.colors, wording.shapes, wording.places, wording.relations)
    out = [p for t in (*tables, wording.relations_it) for ps in t.values() for p in ps]
    templates = wording.one_templates + wording.two_templates + wording.clause_templates
    return out + [re.sub(r"\{\w+\}", " ", t) for t in templates] + list(wording.prefixes)


def words(text: str) -> set[str]:
    """The lower-cased words of ``text`` (as the training vocabulary splits them)."""
    return set(_WORD.findall(text.lower()))


def merged(*parts: Wording) -> Wording:
    """One wording with every phrasing of ``parts``, in order."""

    def tables(name: str) -> Table:
        keys = getattr(parts[0], name)
        return {k: tuple(p for w in parts for p in getattr(w, name)[k]) for k in keys}

    def union(name: str) -> tuple[str, ...]:
        return tuple(t for w in parts for t in getattr(w, name))

    names = ("colors", "shapes", "places", "relations", "relations_it")
    lists = ("one_templates", "two_templates", "clause_templates", "prefixes")
    return Wording(**{n: tables(n) for n in names}, **{n: union(n) for n in lists})


# The seen wording a training config may draw (data.shapes.wording): "standard" is v4's and
# v4.1's; "broad" adds MORE, about twice the phrasings, so that the U-Net learns to read what
# the text encoder says about a word rather than the word.
LEXICONS: dict[str, Wording] = {"standard": SEEN, "broad": merged(SEEN, MORE)}


def seen_words(lexicon: str = "standard") -> set[str]:
    """Every word a caption in the seen wording of ``lexicon`` can have (the grammar's words
    included)."""
    wording = LEXICONS[lexicon]
    out = {w for p in phrases(wording) for w in words(p)} | {w for a in ARTICLES for w in words(a)}
    return out | {"an"}


HELDOUT_WORDS: frozenset[str] = frozenset(
    {w for p in phrases(HELDOUT) for w in words(p)} - set().union(*map(seen_words, LEXICONS))
)


# ---- parsing ------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """Lower case, hyphens as spaces, punctuation but apostrophes dropped, single spaces."""
    text = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " "))
    return " ".join(text.split())


def _reverse(*tables: Table) -> dict[str, str]:
    """Normalised phrasing -> grammar word, over every table given."""
    out: dict[str, str] = {}
    for table in tables:
        for key, options in table.items():
            for option in options:
                out[normalise(option)] = key
    return out


def _alternation(options: dict[str, str]) -> str:
    return "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))


@dataclass(frozen=True)
class _Grammar:
    colors: dict[str, str]
    shapes: dict[str, str]
    places: dict[str, str]
    relations: dict[str, str]
    relations_it: dict[str, str]
    one: tuple[re.Pattern[str], ...]
    two: tuple[re.Pattern[str], ...]
    clauses: tuple[re.Pattern[str], ...]


def _obj(name: str, g: dict[str, dict[str, str]]) -> str:
    color, shape = _alternation(g["colors"]), _alternation(g["shapes"])
    return rf"(?:(?:a|an|one|the) )?(?P<{name}_color>{color}) (?P<{name}_shape>{shape})"


def _patterns(templates: set[str], slots: dict[str, str], prefix: str) -> tuple[re.Pattern, ...]:
    """Each template as an anchored pattern of a normalised caption: its words normalised, its
    slots replaced by ``slots``; templates that start with an object may have a prefix."""
    out = []
    for template in sorted(templates):
        pieces = []
        for part in re.split(r"(\{\w+\})", template):
            if part.startswith("{"):
                pieces.append(slots[part[1:-1]])
            elif literal := normalise(part):
                pieces.append(re.escape(literal))
        head = prefix if _takes_prefix(template) else ""
        out.append(re.compile(f"^{head}{' '.join(pieces)}$"))
    return tuple(out)


def _takes_prefix(template: str) -> bool:
    return template.startswith(("{obj}", "{a}", "{b}"))


@functools.cache
def _grammar() -> _Grammar:
    """The parser's tables and patterns, over all seen and held-out wording together."""
    both = (*LEXICONS.values(), HELDOUT)
    g = {
        name: _reverse(*(getattr(w, name) for w in both))
        for name in ("colors", "shapes", "places", "relations", "relations_it")
    }
    prefixes = {normalise(p): "" for w in both for p in w.prefixes}
    prefix = f"(?:(?:{_alternation(prefixes)}) )?"
    obj, a, b = _obj("o", g), _obj("a", g), _obj("b", g)
    place = f"(?P<place>{_alternation(g['places'])})"
    rel = f"(?P<rel>{_alternation(g['relations'])})"
    relit = f"(?P<rel>{_alternation(g['relations_it'])})"
    one = {t for w in both for t in w.one_templates}
    two = {t for w in both for t in w.two_templates}
    clauses = {t for w in both for t in w.clause_templates}
    return _Grammar(
        **g,
        one=_patterns(one, {"obj": obj, "place": place}, prefix),
        two=_patterns(two, {"a": a, "b": b, "rel": rel}, prefix),
        clauses=_patterns(clauses, {"a": a, "b": b, "relit": relit}, prefix),
    )


def parse_wording(caption: str) -> ParsedCaption | None:
    """The grammar meaning of a caption in any seen or held-out wording; None if it has none.
    Two objects of one colour are a ValueError (the grammar never names them)."""
    g, text = _grammar(), normalise(caption)
    for pattern in g.one:
        if m := pattern.match(text):
            obj = (g.colors[m["o_color"]], g.shapes[m["o_shape"]])
            return ParsedCaption((obj,), place=g.places[m["place"]])
    for patterns, relations in ((g.two, g.relations), (g.clauses, g.relations_it)):
        for pattern in patterns:
            if m := pattern.match(text):
                a = (g.colors[m["a_color"]], g.shapes[m["a_shape"]])
                b = (g.colors[m["b_color"]], g.shapes[m["b_shape"]])
                if a[0] == b[0]:
                    raise ValueError(f"two-object captions name two different colours: {caption!r}")
                return ParsedCaption((a, b), relation=relations[m["rel"]])
    return None


# ---- drawing paraphrases ------------------------------------------------------------------
ONE_SLOTS = ("color", "shape", "place", "template", "prefix")
TWO_SLOTS = ("color", "shape", "relation", "template", "prefix")


class _Phrasing:
    """Draws the choices of one paraphrase; the slot ``held`` (one of ONE_SLOTS or TWO_SLOTS,
    or None) is drawn from the held-out wording, every other slot from ``seen``."""

    def __init__(self, rng: np.random.Generator, held: str | None, seen: Wording) -> None:
        self.rng, self.held, self.seen = rng, held, seen

    def pick(self, options: tuple[str, ...]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def table(self, slot: str, name: str, key: str) -> str:
        wording = HELDOUT if self.held == slot else self.seen
        return self.pick(getattr(wording, name)[key])

    def obj(self, color: str, shape: str, held_here: bool) -> str:
        held, self.held = self.held, self.held if held_here else None
        text = f"{self.table('color', 'colors', color)} {self.table('shape', 'shapes', shape)}"
        self.held = held
        article = self.pick(ARTICLES)
        if article == "a " and text[0] in "aeiou":
            article = "an "
        return article + text

    def template(self, name: str, objects_first: bool) -> str:
        """A template of table ``name`` (held-out ones if the template is the held slot); one
        that takes a prefix where the prefix is the held slot."""
        options = getattr(HELDOUT if self.held == "template" else self.seen, name)
        if objects_first:
            options = tuple(t for t in options if _takes_prefix(t))
        return self.pick(options)

    def finish(self, body: str, template: str) -> str:
        """``body`` with a prefix (sometimes; always where it is the held slot), in a case
        people type, with trailing punctuation."""
        if _takes_prefix(template) and (self.held == "prefix" or self.rng.random() < 0.4):
            body = self.pick((HELDOUT if self.held == "prefix" else self.seen).prefixes) + body
        case = int(self.rng.integers(4))  # as typed, capitalised, title case, upper case
        if case == 1:
            body = body[:1].upper() + body[1:]
        elif case == 2:
            body = " ".join(w[:1].upper() + w[1:] for w in body.split(" "))
        elif case == 3:
            body = body.upper()
        return body + self.pick(PUNCTUATION)


def paraphrase(
    parsed: ParsedCaption,
    rng: np.random.Generator,
    heldout: bool = False,
    lexicon: str = "standard",
) -> str:
    """A caption of ``parsed``'s scene in other words, drawn from ``rng``: seen wording of
    ``lexicon`` only, or with ``heldout`` exactly one part (a colour or shape word, the place or
    relation, the template, or the prefix) in held-out wording."""
    slots = ONE_SLOTS if parsed.place is not None else TWO_SLOTS
    held = slots[int(rng.integers(len(slots)))] if heldout else None
    p = _Phrasing(rng, held, LEXICONS[lexicon])
    which = int(rng.integers(2))  # which object a held-out colour or shape word names
    if parsed.place is not None:
        template = p.template("one_templates", held == "prefix")
        (color, shape), place = parsed.objects[0], p.table("place", "places", parsed.place)
        return p.finish(template.format(obj=p.obj(color, shape, True), place=place), template)
    (a, b), relation = parsed.objects, parsed.relation
    if rng.random() < 0.5:  # "a above b" as "b below a"
        (a, b), relation, which = (b, a), INVERSE[relation], 1 - which
    objs = {"a": p.obj(*a, which == 0), "b": p.obj(*b, which == 1)}
    if rng.random() < 0.4:  # a coordinated clause: "b and a above it"
        template = p.template("clause_templates", held == "prefix")
        relit = p.table("relation", "relations_it", relation)
        return p.finish(template.format(**objs, relit=relit), template)
    template = p.template("two_templates", held == "prefix")
    rel = p.table("relation", "relations", relation)
    return p.finish(template.format(**objs, rel=rel), template)
