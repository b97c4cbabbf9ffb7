"""Word lists for the built-in task suite: a few hundred common English words, names and places.

Lowercase letters only (so letter-level tasks have one answer), short and frequent (so the
135M model's tokenizer knows them), and grouped where a family classifies by kind.
"""

from __future__ import annotations


def _words(text: str) -> tuple[str, ...]:
    words = tuple(text.split())
    assert len(set(words)) == len(words), "duplicate word in a vocabulary list"
    return words


ANIMALS = _words("""
    ant bat bear bee bird camel cat cow crab crow deer dog duck eagle fish fox frog goat goose
    hen horse lamb lion mouse mule owl pig rabbit rat seal shark sheep snail snake spider swan
    tiger turtle whale wolf zebra
""")

FRUITS = _words("""
    apple apricot banana berry cherry coconut date fig grape kiwi lemon lime mango melon orange
    papaya peach pear plum quince raspberry strawberry tangerine
""")

# No "orange": it is a fruit above, and a word must have one kind.
COLORS = _words("black blue brown gold gray green pink purple red silver violet white yellow")

OBJECTS = _words("""
    bag ball basket bed bell bike boat book bottle bowl box bread brush bucket button cake candle
    car card chair clock coat coin cup desk door drum fork glass hammer hat jar key kite knife
    ladder lamp letter map mirror nail needle pan paper pen pencil phone piano pillow plate rope
    ruler shirt shoe sock spoon stamp table tent ticket towel toy train tree truck umbrella vase
    wagon wallet watch wheel window
""")

PLACES = _words("""
    bakery bank beach bridge castle church farm forest garden harbor hill hospital hotel island
    kitchen lake library market museum office park river school shop station stadium street
    theater tower valley village
""")

VERBS = _words("""
    bake build carry catch clean climb cook dance draw drink drive eat find fly follow grow help
    jump kick laugh learn lift listen move open paint play pull push read ride run sing sleep
    swim talk teach throw walk wash watch write
""")

GOOD = _words("""
    amazing beautiful bright brilliant calm charming cheerful clean delicious excellent fantastic
    fresh friendly gentle great happy helpful kind lovely nice perfect pleasant superb tasty
    wonderful
""")

BAD = _words("""
    angry awful bad boring broken cold dirty dull gloomy horrible nasty noisy poor rude sad
    smelly stale terrible ugly unpleasant useless weak wet worse wrong
""")

NEUTRAL_ADJECTIVES = _words("""
    big small long short tall round square heavy light old new young wooden plastic empty full
    quiet loud fast slow thin thick warm soft hard
""")

NAMES = _words("""
    Adam Alice Amir Anna Ben Carlos Chloe Daniel David Elena Emma Ethan Fatima Grace Hana Ivan
    Jack James Julia Kevin Laura Leo Lily Lucas Maria Mark Maya Mia Noah Nora Omar Oscar Paul
    Peter Rosa Ryan Sam Sara Sofia Tom Yuki Zoe
""")

CITIES = _words("""
    Amsterdam Athens Berlin Boston Cairo Chicago Dallas Denver Dublin Lagos Lima Lisbon London
    Madrid Manila Miami Milan Moscow Mumbai Nairobi Oslo Paris Prague Rome Seoul Sydney Tokyo
    Toronto Vienna Warsaw
""")

# Countable things for word problems, as (singular, plural).
ITEMS = tuple(
    (w, w + "s")
    for w in _words("apple ball book card coin cookie cup flower marble pen pencil shell stamp sticker toy")
)

WORDS = tuple(sorted(set(ANIMALS + FRUITS + COLORS + OBJECTS + PLACES + VERBS + GOOD + BAD + NEUTRAL_ADJECTIVES)))
